"""Stopping training at a privacy budget, one way for every callback.

``DPSGD`` and ``GradientDefense`` stop before an epoch that would take ε past ``max_epsilon``;
``LeakageMonitor`` stops when the predicted attack PSNR passes ``max_predicted_psnr``. The
decision is agreed across ranks as ``EarlyStopping`` agrees its own: any rank that wants to stop
stops all of them (``strategy.reduce_boolean_decision(..., all=False)``), so DDP replicas never
disagree about the last epoch.

Example:
    >>> budget = EpsilonBudget("GradientDefense", max_epsilon=2.0)
    >>> budget.check_first_release(epsilon_after=1.5, delta=1e-5, fix="raise the noise")
    >>> try:
    ...     budget.check_first_release(epsilon_after=3.0, delta=1e-5, fix="raise the noise")
    ... except ValueError as err:
    ...     print(str(err)[:58])
    Expected `max_epsilon` to allow at least one more epoch, b
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["EpsilonBudget", "StopReason", "TrainingStop", "stop_training_if"]


class StopReason(str, Enum):
    """Why a privacy callback stopped training."""

    EPSILON_BUDGET = "epsilon_budget"
    """One more epoch would spend more than ``max_epsilon``."""
    LEAKAGE_THRESHOLD = "leakage_threshold"
    """The predicted attack PSNR passed ``max_predicted_psnr``."""


@dataclass(frozen=True)
class TrainingStop:
    """A decision to stop: why, the message shown once, and the step it was taken at.

    Example:
        >>> TrainingStop(StopReason.EPSILON_BUDGET, "one more epoch exceeds ε", 10).reason.value
        'epsilon_budget'
    """

    reason: StopReason
    message: str
    step: int


def stop_training_if(
    trainer: L.Trainer, exceeded: bool, *, reason: StopReason, message: str
) -> TrainingStop | None:
    """Stop training on every rank if ``exceeded`` holds on any rank; say why once.

    Returns:
        The decision, or ``None`` when training goes on.
    """
    stop = trainer.strategy.reduce_boolean_decision(bool(exceeded), all=False)
    if not stop:
        return None
    if not trainer.should_stop:
        rank_zero_info(message)
    trainer.should_stop = True
    return TrainingStop(reason, message, trainer.global_step)


class EpsilonBudget:
    """``max_epsilon`` of one mechanism: refused if one epoch exceeds it, else stops before it.

    Args:
        owner: The callback's name, for messages.
        max_epsilon: The budget; ``None`` never stops.

    Attributes:
        stop: The :class:`TrainingStop` once the budget stopped training, else ``None``.
    """

    def __init__(self, owner: str, max_epsilon: float | None) -> None:
        self.owner = owner
        self.max_epsilon = max_epsilon
        self.stop: TrainingStop | None = None

    def check_first_release(self, *, epsilon_after: float, delta: float, fix: str) -> None:
        """Raise before training if the first epoch alone would exceed the budget."""
        if self.max_epsilon is not None and epsilon_after > self.max_epsilon:
            raise ValueError(
                "Expected `max_epsilon` to allow at least one more epoch, but one epoch already "
                f"spends ε={epsilon_after:.4g} > {self.max_epsilon} at δ={delta:.3g}. {fix}."
            )

    def stop_before_exceeding(
        self, trainer: L.Trainer, *, epsilon: float, epsilon_after: float, delta: float
    ) -> TrainingStop | None:
        """At an epoch's end: stop (agreed across ranks) if the next epoch would exceed it."""
        if self.max_epsilon is None:
            return None
        message = (
            f"{self.owner}: stopping after epoch {trainer.current_epoch}: ε={epsilon:.4g} so far "
            f"and one more epoch would reach ε={epsilon_after:.4g} > max_epsilon="
            f"{self.max_epsilon} (δ={delta:.3g})."
        )
        stop = stop_training_if(
            trainer,
            epsilon_after > self.max_epsilon,
            reason=StopReason.EPSILON_BUDGET,
            message=message,
        )
        self.stop = self.stop or stop
        return stop
