"""The base of every observer callback: schedule, own generator, isolation, history, failures.

An observer measures something about the model during training (an attack on a held-out batch,
an I²F estimate, a membership-inference score) and must never change the training trajectory
nor stop training by failing. What every observer shares lives here and knows nothing about
gradients (the gradient observers add :mod:`lightning_privacy.callbacks._gradient_view`):

* :class:`ObserverSchedule` -- ``every_n_epochs`` / ``every_n_train_steps`` (one of them; neither
  means once per epoch);
* :class:`ScheduledObserver` -- the base callback: runs ``_observe`` on that schedule from
  training hooks (never validation ones: measurements may need autograd), owns the observer's
  generator, history and checkpoint state, gives each instance a ``state_key`` from its defining
  arguments (so two observers of one class coexist in a Trainer and a checkpoint), and applies
  the one failure policy (``on_error="warn"``, the default): a measurement that raises or
  returns NaN warns once per cause with the step, is recorded in ``history``, logs
  ``<prefix>/failed = 1`` and NaN under every key it logged before (so no stale value stands in
  ``callback_metrics`` or the loggers), and training goes on; ``on_error="raise"`` re-raises;
* :func:`isolated` -- a context that forks the global RNG, sets train/eval mode and restores both,
  with attention on its differentiable (math) backend;
* :func:`log_rank_zero` -- rank-0 scalars to every logger and into ``trainer.callback_metrics``.

Example:
    >>> schedule = ObserverSchedule(every_n_epochs=None, every_n_train_steps=10)
    >>> schedule.due_after_step(global_step=20), schedule.due_after_step(global_step=21)
    (True, False)
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from lightning_privacy._validation import check_choice, check_int, check_optional_schedule
from lightning_privacy.functional.gradients import differentiable_attention

__all__ = ["ON_ERROR", "ObserverSchedule", "ScheduledObserver", "isolated", "log_rank_zero"]

#: What an observer does when a measurement fails.
ON_ERROR = ("warn", "raise")


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


class ScheduledObserver(L.Callback):
    """Base class of observer callbacks: schedule, own generator, history, checkpoint state.

    Subclasses implement :meth:`_observe`; it runs after the optimizer step that completes
    ``every_n_train_steps`` or at the end of every ``every_n_epochs``-th epoch (training hooks,
    where autograd is on), at most once per step. An exception in it becomes a warning and a
    ``{"step": ..., "failed": ...}`` entry of :attr:`history`; training continues. Subclasses
    name the arguments that define them in :meth:`_defining_arguments` (for ``state_key``).

    Args:
        every_n_epochs: Run at the end of every n-th training epoch.
        every_n_train_steps: Run after every n-th optimizer step (not both; neither: each epoch).
        seed: Seed of the observer's own generator (never the global RNG).

    Attributes:
        history: One dict per measurement (or failure), restored from checkpoints.
        generator: The observer's own generator, on the module's device after ``setup``.

    Example:
        >>> class Counter(ScheduledObserver):
        ...     def _observe(self, trainer, pl_module, *, on_step):
        ...         self.history.append({"on_step": on_step})
        >>> counter = Counter(every_n_epochs=None, every_n_train_steps=5, seed=0)
        >>> counter.state_dict()["last_step"], counter.state_key
        (-1, "Counter{'every_n_epochs': None, 'every_n_train_steps': 5}")
    """

    metric_prefix: ClassVar[str] = "observer"

    def __init__(
        self,
        *,
        every_n_epochs: int | None,
        every_n_train_steps: int | None,
        seed: int,
        on_error: str = "warn",
    ) -> None:
        self.schedule = ObserverSchedule(every_n_epochs, every_n_train_steps)
        self.seed = check_int("seed", seed)
        self.on_error = check_choice("on_error", on_error, ON_ERROR)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.history: list[dict[str, Any]] = []
        self._last_step = -1
        self._published: set[str] = set()
        self._warned: set[str] = set()

    def _observe(self, trainer: L.Trainer, pl_module: L.LightningModule, *, on_step: bool) -> None:
        raise NotImplementedError

    def _defining_arguments(self) -> dict[str, Any]:
        """The arguments that tell this observer apart from another of its class."""
        return {
            "every_n_epochs": self.schedule.every_n_epochs,
            "every_n_train_steps": self.schedule.every_n_train_steps,
        }

    @property
    @override
    def state_key(self) -> str:
        """Class name and defining arguments: two differently set observers keep two states."""
        return self._generate_state_key(**self._defining_arguments())

    def _subject(self) -> str:
        """What failed, for the failure warning (e.g. ``"the DeepLeakage attack"``)."""
        return "the measurement"

    def _bind_generator(self, device: torch.device) -> None:
        """Move the generator to ``device`` (defenses and attacks draw on the model's device)."""
        if self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, *, on_step: bool) -> None:
        try:
            self._observe(trainer, pl_module, on_step=on_step)
        except Exception as err:  # an observer must never stop training (unless asked to)
            if self.on_error == "raise":
                raise
            self._failed(trainer, f"raised {type(err).__name__}: {err}")
            self._publish(trainer, pl_module, self._failure_metrics(), on_step=on_step)

    def _failed(self, trainer: L.Trainer, what: str) -> None:
        """The failure policy: record, warn once per cause, go on."""
        self.history.append({"step": trainer.global_step, "failed": what})
        cause = what.split(":")[0]
        if cause in self._warned:
            return
        self._warned.add(cause)
        warnings.warn(
            f"{type(self).__name__}: {self._subject()} {what} at step {trainer.global_step}; "
            f"{self.metric_prefix}/failed = 1 and its other metrics are NaN for this step, "
            "training continues.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _failure_metrics(self) -> dict[str, float]:
        """``<prefix>/failed = 1`` and NaN for every key published before."""
        return {f"{self.metric_prefix}/failed": 1.0, **dict.fromkeys(self._published, math.nan)}

    def _publish(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        metrics: Mapping[str, float],
        *,
        on_step: bool,
    ) -> None:
        """Log scalars every rank computed alike (``pl_module.log``); remember their keys."""
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, batch_size=1)
        self._published.update(k for k in metrics if not k.endswith("/failed"))

    @staticmethod
    def _first_nan(metrics: Mapping[str, float]) -> str | None:
        """The first key whose value is NaN (a measurement that "returned NaN")."""
        return next((k for k, v in metrics.items() if isinstance(v, float) and math.isnan(v)), None)

    @override
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
            self._run(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Observe at the end of every ``every_n_epochs``-th epoch."""
        if self.schedule.due_after_epoch(trainer.current_epoch):
            self._run(trainer, pl_module, on_step=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        """History, generator state and the last observed step (a resumed run continues)."""
        return {
            "history": list(self.history),
            "generator_state": self.generator.get_state(),
            "last_step": self._last_step,
            "seed": self.seed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.history = list(state_dict.get("history", []))
        if "generator_state" in state_dict:
            self.generator.set_state(state_dict["generator_state"])
        self._last_step = int(state_dict.get("last_step", -1))


@contextlib.contextmanager
def isolated(
    module: nn.Module, *, train: bool, seed: int | None = None, differentiable: bool = True
) -> Iterator[None]:
    """Fork the global RNG, set train/eval mode, and restore both on exit.

    Dropout inside the block draws from a forked stream seeded with ``seed``, so the training
    stream is bitwise unchanged. With ``differentiable`` (the default) attention runs on its math
    backend (:func:`~lightning_privacy.functional.gradients.differentiable_attention`), which has
    the double backward and forward-mode derivatives the measurements need; a measurement that
    only forwards (membership scores) passes ``False`` and keeps PyTorch's fastest kernel.

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
    attention = differentiable_attention() if differentiable else contextlib.nullcontext()
    with torch.random.fork_rng(devices=devices), attention:
        if seed is not None:
            torch.manual_seed(seed)
        module.train(train)
        try:
            yield
        finally:
            for name, sub in module.named_modules():
                sub.training = modes[name]


def log_rank_zero(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send rank-0 scalars to every logger and copy them into ``trainer.callback_metrics``.

    ``EarlyStopping(monitor=...)`` can then watch them.
    """
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(float(value))
