"""The gradient view of an observer: what the simulated attacker sees of the Trainer.

The gradient observers (``InversionAudit``, ``LeakageMonitor``) attack or estimate the gradient of
a fixed held-out batch as it leaves the process, after the Trainer's defense. This module holds
what they share on top of :mod:`lightning_privacy.callbacks._observer`:

* :class:`DefenseView` and :func:`find_gradient_defense` -- the ``GradientDefense`` (or
  ``DPSGD``) in the Trainer, whose transforms and ``layers`` the attacker faces;
* :func:`fix_held_out_batch`, :func:`split_batch` -- the batch an observer watches, taken once;
* :func:`observed_gradients` -- the gradient the attacker sees: computed with
  ``torch.func.functional_call`` on detached parameters, then passed through the defense;
* :func:`module_loss_fn` -- the loss the attacker differentiates.

Example:
    >>> import torch
    >>> x, y = split_batch((torch.zeros(4, 3), torch.arange(4)), 2)
    >>> tuple(x.shape), y.tolist()
    ((2, 3), [0, 1])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_privacy.callbacks import _trainer_internals as internals
from lightning_privacy.callbacks._observer import isolated
from lightning_privacy.defenses.base import GradientTransform, apply_transforms
from lightning_privacy.functional.gradients import parameter_gradients, select_parameters

if TYPE_CHECKING:
    from lightning_privacy.callbacks.dpsgd import DPSGD
    from lightning_privacy.callbacks.gradient_defense import GradientDefense

__all__ = [
    "DefenseView",
    "ObservedGradients",
    "find_gradient_defense",
    "fix_held_out_batch",
    "has_validation_data",
    "module_loss_fn",
    "observed_gradients",
    "split_batch",
    "used_parameters",
    "validation_batch",
]


class DefenseView(Protocol):
    """What the attacker knows of the Trainer's defense: its transforms and where they apply."""

    @property
    def transforms(self) -> Sequence[GradientTransform]:
        """The pipeline applied to the shared gradient."""

    @property
    def layers(self) -> str | Sequence[str] | None:
        """The parameter-name selection the pipeline acts on (``None``: all)."""


def validation_batch(trainer: L.Trainer) -> Any:
    """The first batch of the validation data of ``trainer`` (datamodule, module or ``fit`` arg).

    Raises:
        ValueError: If the Trainer has no validation data.
    """
    source = internals.validation_source(trainer)
    loader = source.dataloader() if source is not None and source.is_defined() else None
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if loader is None:
        raise ValueError(
            "Expected validation data to take the held-out batch from, but the Trainer has none. "
            "Pass `batch=(inputs, targets)` to the callback or give the Trainer a val_dataloader."
        )
    return next(iter(loader))


def fix_held_out_batch(
    trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *, seed: int
) -> Any:
    """The batch an observer watches: ``batch`` if given, else the first validation batch.

    Taken once, in ``setup``, from the user's own validation loader (before Lightning shards it
    with a distributed sampler), so every rank holds the same batch and every measurement of a
    run is on the same examples. Reading the loader draws from the global RNG, so it is read
    inside :func:`isolated`. ``None`` when there is neither.
    """
    if batch is not None or not has_validation_data(trainer):
        return batch
    with isolated(pl_module, train=pl_module.training, seed=seed):
        return validation_batch(trainer)


def has_validation_data(trainer: L.Trainer) -> bool:
    """Whether ``trainer`` can provide a validation batch (checked before training)."""
    source = internals.validation_source(trainer)
    return bool(source is not None and source.is_defined())


def split_batch(batch: Any, num_samples: int) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` of the first ``num_samples`` examples of an ``(x, y, ...)`` batch."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError(
            "Expected a held-out batch of the form (inputs, targets), "
            f"but got {type(batch).__name__}."
        )
    inputs, targets = batch[0], batch[1]
    if num_samples > len(inputs):
        raise ValueError(
            f"Expected `num_samples` to be <= the held-out batch size {len(inputs)}, "
            f"but got {num_samples} (int)."
        )
    return inputs[:num_samples], targets[:num_samples]


def find_gradient_defense(trainer: L.Trainer) -> GradientDefense | DPSGD | None:
    """The ``GradientDefense`` callback of ``trainer``, if any (the defense the attacker faces).

    A ``DPSGD`` callback counts too: its ``transforms`` are the attacker's view of one example's
    DP-SGD release (its gradient clipped to ``C``, plus ``N(0, (z C)^2)`` noise).
    """
    from lightning_privacy.callbacks.dpsgd import DPSGD
    from lightning_privacy.callbacks.gradient_defense import GradientDefense

    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, GradientDefense):
            return callback
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, DPSGD):
            return callback
    return None


def module_loss_fn(pl_module: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The module's ``loss_fn`` attribute, or mean cross-entropy."""
    loss_fn = getattr(pl_module, "loss_fn", None)
    return loss_fn if callable(loss_fn) else F.cross_entropy


@dataclass(frozen=True)
class ObservedGradients:
    """The attacker's view of one held-out batch.

    Attributes:
        names: Parameter names, in ``named_parameters`` order.
        original: Undefended gradients.
        defended: Gradients after the Trainer's ``GradientDefense`` (equal to ``original`` when
            there is none or defenses are not applied).
        defended_names: Names the defense acted on (its ``layers=`` selection).
    """

    names: list[str]
    original: list[Tensor]
    defended: list[Tensor]
    defended_names: list[str]

    @property
    def delta(self) -> list[Tensor]:
        """``defended - original`` per parameter."""
        return [d - o for d, o in zip(self.defended, self.original, strict=True)]


def observed_gradients(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    defense: DefenseView | None,
    generator: torch.Generator | None,
) -> ObservedGradients:
    """Gradients of the held-out batch at the current weights, before and after the defense.

    The defense is applied to the parameters its ``layers=`` selects, as in the Trainer; under
    DDP with ``placement="local"`` this is the per-rank view (one rank's gradient leaving it).
    """
    grads = parameter_gradients(model, inputs, targets, loss_fn=loss_fn)
    names = list(grads)
    original = [g.detach() for g in grads.values()]
    if defense is None:
        return ObservedGradients(names, original, list(original), [])
    chosen = list(select_parameters(model, defense.layers))
    index = [names.index(n) for n in chosen if n in grads]
    defended = list(original)
    new = apply_transforms(defense.transforms, [original[i] for i in index], generator=generator)
    for i, g in zip(index, new, strict=True):
        defended[i] = g
    return ObservedGradients(names, original, defended, [names[i] for i in index])


def used_parameters(names: Sequence[str], model: nn.Module) -> dict[str, Tensor]:
    """The parameters of ``model`` named in ``names``."""
    params = dict(model.named_parameters())
    return {n: params[n] for n in names}
