"""Shared machinery of the observer callbacks (``InversionAudit``, ``LeakageMonitor``).

Observers simulate the attacker on a held-out batch and must never change the training
trajectory. This module holds what they share:

* :class:`ObserverSchedule` -- ``every_n_epochs`` / ``every_n_train_steps`` (one of them; neither
  means once per epoch);
* :class:`ScheduledObserver` -- the base callback: runs ``_observe`` on that schedule from
  training hooks (never validation ones: attacks need autograd), owns the observer's generator,
  history and checkpoint state;
* :class:`DefenseView` -- what an observer needs of the Trainer's defense (``transforms``,
  ``layers``), provided by ``GradientDefense`` and ``DPSGD``;
* :func:`validation_batch` -- the first batch of the Trainer's validation data, whatever its source;
* :func:`find_gradient_defense` -- the ``GradientDefense`` in the Trainer, whose transforms the
  attacker sees;
* :func:`isolated` -- a context that forks the RNG, sets train/eval mode and restores both;
* :func:`observed_gradients` -- the gradient the attacker sees: computed with
  ``torch.func.functional_call`` on detached parameters, then passed through the defense.

Example:
    >>> schedule = ObserverSchedule(every_n_epochs=None, every_n_train_steps=10)
    >>> schedule.due_after_step(global_step=20), schedule.due_after_step(global_step=21)
    (True, False)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_privacy._validation import check_int, check_optional_schedule
from lightning_privacy.defenses.base import GradientTransform, apply_transforms
from lightning_privacy.functional.gradients import parameter_gradients, select_parameters

if TYPE_CHECKING:
    from lightning_privacy.callbacks.dpsgd import DPSGD
    from lightning_privacy.callbacks.gradient_defense import GradientDefense


class ObserverSchedule:
    """When an observer runs: every ``n`` epochs or every ``n`` optimizer steps.

    Args:
        every_n_epochs: Run at the end of every n-th training epoch.
        every_n_train_steps: Run after every n-th optimizer step.
    """

    def __init__(self, every_n_epochs: int | None, every_n_train_steps: int | None) -> None:
        self.every_n_epochs, self.every_n_train_steps = check_optional_schedule(
            every_n_epochs, every_n_train_steps
        )

    def due_after_step(self, global_step: int) -> bool:
        """Whether to run after the optimizer step that brought the counter to ``global_step``."""
        n = self.every_n_train_steps
        return n is not None and global_step > 0 and global_step % n == 0

    def due_after_epoch(self, epoch: int) -> bool:
        """Whether to run at the end of (0-based) ``epoch``."""
        n = self.every_n_epochs
        return n is not None and (epoch + 1) % n == 0


class DefenseView(Protocol):
    """What the attacker knows of the Trainer's defense: its transforms and where they apply."""

    @property
    def transforms(self) -> Sequence[GradientTransform]:
        """The pipeline applied to the shared gradient."""

    @property
    def layers(self) -> str | Sequence[str] | None:
        """The parameter-name selection the pipeline acts on (``None``: all)."""


class ScheduledObserver(L.Callback):
    """Base class of observer callbacks: schedule, own generator, history, checkpoint state.

    Subclasses implement :meth:`_observe`; it runs after the optimizer step that completes
    ``every_n_train_steps`` or at the end of every ``every_n_epochs``-th epoch (training hooks,
    where autograd is on), at most once per step.

    Args:
        every_n_epochs: Run at the end of every n-th training epoch.
        every_n_train_steps: Run after every n-th optimizer step (not both; neither: each epoch).
        seed: Seed of the observer's own generator (never the global RNG).

    Example:
        >>> class Counter(ScheduledObserver):
        ...     def _observe(self, trainer, pl_module, *, on_step):
        ...         self.history.append({"on_step": on_step})
        >>> counter = Counter(every_n_epochs=None, every_n_train_steps=5, seed=0)
        >>> counter.state_dict()["last_step"]
        -1
    """

    def __init__(
        self, *, every_n_epochs: int | None, every_n_train_steps: int | None, seed: int
    ) -> None:
        self.schedule = ObserverSchedule(every_n_epochs, every_n_train_steps)
        self.seed = check_int("seed", seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.history: list[dict[str, Any]] = []
        self._last_step = -1

    def _observe(self, trainer: L.Trainer, pl_module: L.LightningModule, *, on_step: bool) -> None:
        raise NotImplementedError

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Observe after the optimizer step that completes ``every_n_train_steps``."""
        step = trainer.global_step
        if step != self._last_step and self.schedule.due_after_step(step):
            self._last_step = step
            self._observe(trainer, pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Observe at the end of every ``every_n_epochs``-th epoch."""
        if self.schedule.due_after_epoch(trainer.current_epoch):
            self._observe(trainer, pl_module, on_step=False)

    def state_dict(self) -> dict[str, Any]:
        """History, generator state and the last observed step (a resumed run continues)."""
        return {
            "history": list(self.history),
            "generator_state": self.generator.get_state(),
            "last_step": self._last_step,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.history = list(state_dict.get("history", []))
        if "generator_state" in state_dict:
            self.generator.set_state(state_dict["generator_state"])
        self._last_step = int(state_dict.get("last_step", -1))


def _val_source(trainer: L.Trainer) -> Any:
    """The validation ``_DataLoaderSource`` (on the fit loop since Lightning 2.0)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    source = getattr(getattr(loop, "val_loop", None), "_data_source", None)
    if source is None:  # older layouts kept it on the data connector
        connector = getattr(trainer, "_data_connector", None)
        source = getattr(connector, "_val_dataloader_source", None)
    return source


def validation_batch(trainer: L.Trainer) -> Any:
    """The first batch of the validation data of ``trainer`` (datamodule, module or ``fit`` arg).

    Raises:
        ValueError: If the Trainer has no validation data.
    """
    source = _val_source(trainer)
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
    source = _val_source(trainer)
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


@contextlib.contextmanager
def isolated(module: nn.Module, *, train: bool, seed: int | None = None) -> Iterator[None]:
    """Fork the global RNG, set train/eval mode, and restore both on exit.

    Dropout inside the block draws from a forked stream seeded with ``seed``, so the training
    stream is bitwise unchanged.

    Example:
        >>> m = torch.nn.Dropout(0.5).train()
        >>> state = torch.get_rng_state()
        >>> with isolated(m, train=True, seed=0):
        ...     _ = m(torch.ones(4))
        >>> torch.equal(state, torch.get_rng_state()), m.training
        (True, True)
    """
    modes = {name: sub.training for name, sub in module.named_modules()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        module.train(train)
        try:
            yield
        finally:
            for name, sub in module.named_modules():
                sub.training = modes[name]


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


def log_rank_zero(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send rank-0 scalars to every logger and copy them into ``trainer.callback_metrics``.

    ``EarlyStopping(monitor=...)`` can then watch them.
    """
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(float(value))


def used_parameters(names: Sequence[str], model: nn.Module) -> dict[str, Tensor]:
    """The parameters of ``model`` named in ``names``."""
    params = dict(model.named_parameters())
    return {n: params[n] for n in names}
