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

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_privacy._validation import check_float, check_int
from lightning_privacy.adapters import AdaptedModel, ModelAdapter, check_adapter, resolve_adapter
from lightning_privacy.callbacks import _trainer_internals as internals
from lightning_privacy.callbacks._observer import ScheduledObserver, isolated
from lightning_privacy.defenses.base import GradientTransform, apply_transforms
from lightning_privacy.functional.gradients import parameter_gradients, select_parameters

if TYPE_CHECKING:
    from lightning_privacy.callbacks.dpsgd import DPSGD
    from lightning_privacy.callbacks.gradient_defense import GradientDefense

__all__ = [
    "DefenseView",
    "GradientObserver",
    "ObservedGradients",
    "find_gradient_defense",
    "fix_held_out_batch",
    "has_validation_data",
    "module_loss_fn",
    "observed_gradients",
    "split_batch",
    "training_step_loss",
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


class GradientObserver(ScheduledObserver):
    """Base of the observers that replay the training loss on a fixed held-out batch.

    It takes the batch once (``batch=`` or the first validation batch), splits it with the
    :class:`~lightning_privacy.ModelAdapter` (``adapter=``, else the module's ``privacy_adapter``,
    else the default), and before the first training step runs one forward, loss and gradient of
    it through the adapter (:func:`~lightning_privacy.adapters.check_adapter`): every problem is
    raised at once, naming the fix. It also compares the adapter's loss with what
    ``training_step`` returns on that batch and warns when they differ: the observers would then
    attack another gradient than the one training shares.

    Args:
        batch: The held-out batch in any format the adapter unpacks; default: the first
            validation batch.
        num_samples: Examples of it the measurement uses.
        adapter: How to replay the loss (:class:`~lightning_privacy.ModelAdapter`).
        max_seconds: Wall-time bound of one measurement.
        every_n_epochs: See :class:`ScheduledObserver`.
        every_n_train_steps: See :class:`ScheduledObserver`.
        seed: See :class:`ScheduledObserver`.
        on_error: See :class:`ScheduledObserver`.
    """

    #: Take at most the batch's size when ``num_samples`` asks for more (else it is an error).
    clamp_num_samples: ClassVar[bool] = False

    def __init__(
        self,
        *,
        every_n_epochs: int | None,
        every_n_train_steps: int | None,
        batch: Any,
        num_samples: int,
        adapter: ModelAdapter | None,
        max_seconds: float | None,
        seed: int,
        on_error: str,
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            seed=seed,
            on_error=on_error,
        )
        self.num_samples = check_int("num_samples", num_samples, low=1)
        if adapter is not None and not isinstance(adapter, ModelAdapter):
            raise TypeError(
                "Expected `adapter` to be a lightning_privacy.ModelAdapter, but got "
                f"{type(adapter).__name__}."
            )
        self.adapter = adapter
        self.max_seconds = (
            None
            if max_seconds is None
            else check_float("max_seconds", max_seconds, low=0.0, low_open=True)
        )
        if batch is not None:  # the format is checked now; the module's own adapter in setup
            try:
                self._held_out_of(adapter or ModelAdapter(), batch)
            except TypeError as err:
                raise TypeError(f"Invalid `batch` argument: {err}") from None
        self.batch = batch
        self._adapter: ModelAdapter | None = None
        self._held_out: tuple[Tensor, Tensor] | None = None
        self._raw_batch: Any = None

    def _needs_continuous(self) -> bool:
        """Whether the measurement differentiates with respect to the inputs (attacks, I2F)."""
        return True

    def _setup_problems(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        """Further problems a subclass finds before training (default: none)."""
        return []

    def _held_out_of(self, adapter: ModelAdapter, batch: Any) -> tuple[Tensor, Tensor]:
        inputs, targets = adapter.unpack(batch)
        size = len(inputs) if isinstance(inputs, Tensor) else 0
        if self.num_samples > size and not self.clamp_num_samples:
            raise ValueError(
                f"Expected `num_samples` to be <= the held-out batch size {size}, "
                f"but got {self.num_samples} (int)."
            )
        n = min(self.num_samples, size)
        return inputs[:n].detach().clone(), targets[:n].detach().clone()

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Take and split the held-out batch; collect every problem found before training."""
        if stage != "fit":
            return
        self._adapter = resolve_adapter(pl_module, self.adapter)
        problems: list[str] = []
        batch = fix_held_out_batch(trainer, pl_module, self.batch, seed=self.seed)
        if batch is None:
            problems.append(
                "no held-out batch: pass `batch=(inputs, targets)` or give the Trainer "
                "validation data"
            )
        else:
            try:
                self._held_out = self._held_out_of(self._adapter, batch)
                self._raw_batch = _first_examples(batch, len(self._held_out[0]))
            except (TypeError, ValueError) as err:
                problems.append(str(err).rstrip("."))
        problems += self._setup_problems(trainer, pl_module)
        if problems:
            raise ValueError(f"{type(self).__name__} cannot run: " + "; ".join(problems) + ".")
        self._bind_generator(pl_module.device)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Replay the loss once through the adapter: fail now, not at the first measurement."""
        adapter, (inputs, targets) = self._require_adapter(), self._device_held_out(pl_module)
        with isolated(pl_module, train=False, seed=self.seed), torch.enable_grad():
            problems = check_adapter(
                pl_module, adapter, inputs, targets, continuous=self._needs_continuous()
            )
        if problems:
            raise ValueError(
                f"{type(self).__name__} cannot replay the training loss on the held-out batch: "
                + "; ".join(problems)
                + "."
            )
        self._compare_with_training_step(pl_module, adapter, inputs, targets)

    def _compare_with_training_step(
        self, pl_module: L.LightningModule, adapter: ModelAdapter, inputs: Tensor, targets: Tensor
    ) -> None:
        with isolated(pl_module, train=False, seed=self.seed), torch.no_grad():
            replayed = float(adapter.loss(adapter.forward(pl_module, inputs), targets))
        trained = training_step_loss(pl_module, self._raw_batch, seed=self.seed)
        name = type(self).__name__
        if trained is None:
            if adapter.loss_source == "default cross-entropy":
                rank_zero_info(
                    f"{name} replays the training loss as mean cross-entropy (the module has no "
                    "`loss_fn`); pass adapter=ModelAdapter(loss_fn=...) if training_step uses "
                    "another loss."
                )
            return
        if abs(replayed - trained) > 1e-4 * max(1.0, abs(trained)):
            rank_zero_warn(
                f"{name}: the loss the observers replay ({replayed:.6g}, {adapter.loss_source}) "
                f"differs from the loss training_step returns on the held-out batch "
                f"({trained:.6g}): the gradient they attack is not the one training shares. Pass "
                "adapter=ModelAdapter(loss_fn=...) with training_step's loss and reduction."
            )

    def _require_adapter(self) -> ModelAdapter:
        if self._adapter is None or self._held_out is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before training hooks.")
        return self._adapter

    def _device_held_out(self, pl_module: L.LightningModule) -> tuple[Tensor, Tensor]:
        assert self._held_out is not None  # set in setup
        inputs, targets = self._held_out
        return inputs.to(pl_module.device), targets.to(pl_module.device)

    def _adapted(self, pl_module: L.LightningModule, *, embedded: bool = False) -> AdaptedModel:
        """The module as ``inputs -> outputs`` through the adapter (same parameter names)."""
        return AdaptedModel(pl_module, self._require_adapter(), embedded=embedded)


def _first_examples(batch: Any, n: int) -> Any:
    """The first ``n`` examples of a tuple/list/dict batch of tensors (``None``: cannot slice)."""
    if isinstance(batch, Mapping):
        return {k: v[:n] if isinstance(v, Tensor) else v for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(v[:n] if isinstance(v, Tensor) else v for v in batch)
    return None


def training_step_loss(pl_module: L.LightningModule, batch: Any, *, seed: int) -> float | None:
    """The loss ``training_step`` returns on ``batch`` in eval mode, with no side effect.

    Logging is silenced, torchmetrics states are restored, the global RNG is forked and no graph
    is built. ``None`` when it cannot be run that way (manual optimization, no batch, an error, a
    result without a loss).
    """
    if batch is None or not pl_module.automatic_optimization:
        return None
    with isolated(pl_module, train=False, seed=seed), torch.no_grad(), _quiet(pl_module):
        try:
            result = pl_module.training_step(batch, 0)
        except Exception:  # the comparison is a courtesy; the adapter's own check has run
            return None
    loss = result.get("loss") if isinstance(result, Mapping) else result
    if not isinstance(loss, Tensor) or loss.ndim > 1 or loss.numel() == 0:
        return None
    return float(loss.float().mean())  # per-sample losses (DPSGD's opt-in) count as their mean


@contextlib.contextmanager
def _quiet(pl_module: L.LightningModule) -> Iterator[None]:
    """No ``self.log`` / ``self.log_dict`` and torchmetrics states put back afterwards."""
    import copy

    from torchmetrics import Metric

    metrics = [m for m in pl_module.modules() if isinstance(m, Metric)]
    saved = [copy.deepcopy((m.metric_state, m._update_count, m._computed)) for m in metrics]
    silent: Any = lambda *args, **kwargs: None  # noqa: E731 (one no-op for both methods)
    pl_module.log = pl_module.log_dict = silent  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict
        for metric, (state, count, computed) in zip(metrics, saved, strict=True):
            for name, value in state.items():
                setattr(metric, name, value)
            metric._update_count, metric._computed = count, computed
