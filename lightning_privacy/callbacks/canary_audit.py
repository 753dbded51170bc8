"""A one-run privacy audit with canaries: an audited ε lower bound beside the accountant's ε.

Steinke, Nasr and Jagielski (2023), "Privacy Auditing with One (1) Training Run": the training
set holds ``m`` canaries, each put in with probability ½ (:func:`lightning_privacy.data.
with_canaries`). At the end of ``fit`` ``CanaryAudit`` scores every canary with a membership
attack (``loss`` by default), guesses "in" for the highest-scored and "out" for the
lowest-scored, and turns the number of right guesses into an ε that the training provably does
not satisfy, at 95 % confidence (:func:`~lightning_privacy.functional.membership.
one_run_epsilon_lower_bound`). It logs:

* ``audit/epsilon_lower_bound``, ``audit/guesses``, ``audit/correct_guesses``, ``audit/canaries``
  and ``audit/delta`` (the δ tested: the accountant's);
* ``audit/accountant_epsilon`` -- the ``privacy/epsilon`` of the Trainer's ``DPSGD`` (or of a
  ``GradientDefense`` with a formal mechanism) at the same δ, and ``audit/consistent`` (1 when
  the audited bound does not exceed it).

A correct accountant is never below the audited bound, except with probability 5 %: a bound above
the accountant's ε is a ``RuntimeWarning`` naming both numbers (a wrong accountant, a DP
implementation that does not do what it says, or that 5 % event). Without an accountant the bound
is reported alone (δ = ``delta``, default 1e-5).

Ranks: every rank scores the same canaries with the same model and logs the same values (to
rank 0's loggers). The model is scored in eval mode, without gradients, with the global RNG
forked; nothing is written anywhere but the loggers.

Example:
    >>> import lightning as L, torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from lightning_privacy.data import load_digits_tensors, with_canaries
    >>> from lightning_privacy.models import LeNetDLG, LitClassifier
    >>> x, y = load_digits_tensors(image_size=8)
    >>> train = with_canaries(TensorDataset(x[:200], y[:200]), num_canaries=40, seed=0)
    >>> audit = CanaryAudit()
    >>> trainer = L.Trainer(max_epochs=1, callbacks=[audit], logger=False,
    ...                     enable_progress_bar=False, enable_checkpointing=False,
    ...                     enable_model_summary=False)
    >>> trainer.fit(LitClassifier(LeNetDLG(channels=1, image_size=8)), DataLoader(train, 32))
    >>> audit.history[0]["canaries"], trainer.callback_metrics["audit/epsilon_lower_bound"] >= 0
    (40, tensor(True))
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lightning_privacy._validation import check_float, check_int
from lightning_privacy.adapters import ModelAdapter, resolve_adapter
from lightning_privacy.callbacks import _trainer_internals as internals
from lightning_privacy.callbacks._observer import ScheduledObserver, isolated, log_rank_zero
from lightning_privacy.callbacks.membership_audit import (
    DEFAULT_DELTA,
    accountant_privacy,
    forward_logits,
    resolve_membership_attack,
)
from lightning_privacy.data.canaries import Canaries, check_canaries, find_canaries
from lightning_privacy.functional.membership import one_run_epsilon_lower_bound
from lightning_privacy.membership import MembershipAttack, MembershipQuery

__all__ = ["CanaryAudit"]


class CanaryAudit(ScheduledObserver):
    """Audit ε from the canaries of one training run at the end of ``fit`` (Steinke et al. 2023).

    Args:
        canaries: The :class:`~lightning_privacy.data.Canaries` (or the data set made by
            :func:`~lightning_privacy.data.with_canaries`); default: found in the fit's train
            loader.
        attack: A threshold membership attack (name or instance) scoring the canaries.
        delta: δ to test when the Trainer has no accountant (default 1e-5); with one, its δ.
        confidence: Confidence of the bound.
        guesses: Total guess counts to try (see ``one_run_epsilon_lower_bound``).
        adapter: How to call the module (:class:`~lightning_privacy.ModelAdapter`).
        batch_size: Canaries per forward pass.
        on_error: ``"warn"`` or ``"raise"`` (the observers' failure policy).
        seed: Seed of the forked RNG the scoring runs under.

    Attributes:
        history: The audit's result (one dict).

    Example:
        >>> CanaryAudit(attack="confidence").attack
        ConfidenceAttack()
    """

    metric_prefix = "audit"

    def __init__(
        self,
        canaries: Canaries | Any = None,
        *,
        attack: str | MembershipAttack = "loss",
        delta: float | None = None,
        confidence: float = 0.95,
        guesses: Sequence[int] | None = None,
        adapter: ModelAdapter | None = None,
        batch_size: int = 256,
        on_error: str = "warn",
        seed: int = 0,
    ) -> None:
        super().__init__(
            every_n_epochs=None, every_n_train_steps=None, seed=seed, on_error=on_error
        )
        self.canaries = None if canaries is None else check_canaries(canaries)
        self.attack = resolve_membership_attack(attack)
        if self.attack.needs_reference:
            raise ValueError(
                f"Expected `attack` to be a threshold attack (loss, confidence, entropy, "
                f"modified_entropy), but got {type(self.attack).__name__}, which needs reference "
                "models the canaries were left out of."
            )
        self.delta = (
            None
            if delta is None
            else check_float("delta", delta, low=0.0, high=1.0, low_open=True, high_open=True)
        )
        self.confidence = check_float(
            "confidence", confidence, low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.guesses = None if guesses is None else tuple(guesses)
        self.adapter = adapter
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self._canaries: Canaries | None = self.canaries

    def _defining_arguments(self) -> dict[str, Any]:
        return {"attack": repr(self.attack)}

    def _subject(self) -> str:
        return "the canary audit"

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Find the canaries (in the train loader's data set unless given) before training."""
        if stage != "fit":
            return
        if self.canaries is None:
            loader = internals.train_dataloader_before_fit(trainer)
            self._canaries = find_canaries(getattr(loader, "dataset", None))
        if self._canaries is None:
            raise ValueError(
                "CanaryAudit cannot run: the training data holds no canaries. Build it with "
                "lightning_privacy.data.with_canaries(dataset, num_canaries=..., seed=...) or pass "
                "CanaryAudit(canaries=...)."
            )

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Nothing during training: the audit is of the trained model."""

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing during training: the audit is of the trained model."""

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score the canaries with the trained model and log the audited ε."""
        self._run(trainer, pl_module, on_step=False)

    def _publish(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        metrics: Mapping[str, float],
        *,
        on_step: bool,
    ) -> None:
        """``on_train_end`` cannot ``self.log``: to the loggers and ``callback_metrics``."""
        log_rank_zero(trainer, dict(metrics), trainer.global_step)
        self._published.update(k for k in metrics if not k.endswith("/failed"))

    def _observe(self, trainer: L.Trainer, pl_module: L.LightningModule, *, on_step: bool) -> None:
        canaries = self._canaries
        assert canaries is not None  # found in setup
        adapter = resolve_adapter(pl_module, self.adapter)
        with isolated(pl_module, train=False, seed=self.seed), torch.no_grad():
            logits = forward_logits(pl_module, adapter, canaries.inputs, batch_size=self.batch_size)
        query = MembershipQuery(logits, canaries.targets, loss_fn=adapter.loss)
        scores = self.attack.score(query)
        epsilon, accountant_delta = accountant_privacy(trainer)
        delta = accountant_delta if accountant_delta is not None else self.delta or DEFAULT_DELTA
        bound, detail = one_run_epsilon_lower_bound(
            scores,
            canaries.included.double(),
            delta=delta,
            confidence=self.confidence,
            guesses=self.guesses,
        )
        metrics = {
            "audit/epsilon_lower_bound": bound,
            "audit/guesses": float(detail["guesses"]),
            "audit/correct_guesses": float(detail["correct"]),
            "audit/canaries": float(detail["canaries"]),
            "audit/delta": delta,
            "audit/failed": 0.0,
        }
        if epsilon is not None:
            metrics["audit/accountant_epsilon"] = epsilon
            metrics["audit/consistent"] = float(bound <= epsilon)
            self._check_accountant(bound, epsilon, delta)
        self._publish(trainer, pl_module, metrics, on_step=on_step)
        self.history.append({"step": trainer.global_step, **detail, **metrics})

    def _check_accountant(self, bound: float, epsilon: float, delta: float) -> None:
        if math.isfinite(epsilon) and bound > epsilon:
            warnings.warn(
                f"CanaryAudit: the audited ε lower bound {bound:.3f} exceeds the accountant's ε "
                f"{epsilon:.3f} at δ = {delta:.3g}. Either the accountant (or the DP training it "
                "describes) is wrong, or an event of probability "
                f"{1 - self.confidence:.0%} happened.",
                RuntimeWarning,
                stacklevel=2,
            )
