"""Where ``GradientDefense`` acts on the gradient: one object per placement, chosen in ``setup``.

* :class:`SingleProcess` (``"single"``): ``.grad`` in ``on_before_optimizer_step`` -- after
  accumulation and fp16 unscaling, before the Trainer's clipping and the optimizer; the noise of
  additive-noise pipelines is drawn ahead in a background thread (:class:`NoiseAhead`).
* :class:`Aggregate` (``"aggregate"``): the same, under DDP, on the averaged gradient after the
  all-reduce, with the seed broadcast from rank 0 so every replica draws identical noise.
* :class:`LocalCommHook` (``"local"``): what leaves each rank -- a DDP communication hook defends
  the rank's local gradient before the all-reduce, with an independent stream per rank.

Each placement gets the fit's hooks it needs (``attach`` at fit start, then per batch and per
optimizer step) and nothing else; the callback keeps the settings, the accounting and logging.

Example:
    >>> from lightning_privacy.defenses import GaussianNoise
    >>> from lightning_privacy.defenses.in_place import InPlaceDefense
    >>> placement = placement_for("single", InPlaceDefense([GaussianNoise(std=0.1)], seed=0))
    >>> placement.name, type(placement).__name__
    ('single', 'SingleProcess')
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_privacy.callbacks import _trainer_internals as internals
from lightning_privacy.callbacks._noise_ahead import NoiseAhead, noise_key
from lightning_privacy.defenses.base import can_draw_noise_ahead
from lightning_privacy.defenses.in_place import InPlaceDefense
from lightning_privacy.functional.seeding import derive_seed

__all__ = ["Aggregate", "LocalCommHook", "Placement", "SingleProcess", "placement_for"]


class Placement:
    """Base class: the defended parameters and the fit hooks a placement may use.

    Args:
        defense: The pipeline, applied in place (:class:`InPlaceDefense`).
        draw_noise_ahead: Whether additive noise may be drawn in a background thread.
    """

    name: ClassVar[str]

    def __init__(self, defense: InPlaceDefense, *, draw_noise_ahead: bool = True) -> None:
        self.defense = defense
        self.draw_noise_ahead = draw_noise_ahead
        self.params: dict[str, nn.Parameter] = {}
        self.scaler: Any = None

    def attach(self, trainer: L.Trainer, params: dict[str, nn.Parameter]) -> None:
        """At fit start: the parameters to defend, the fp16 loss scaler if one is active."""
        self.params = params
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None

    def on_train_start(self, trainer: L.Trainer) -> None:
        """After the optimizers exist."""

    def on_train_batch_start(self, trainer: L.Trainer) -> None:
        """Before a batch's forward pass."""

    def on_train_batch_end(self, trainer: L.Trainer) -> None:
        """After a batch (and its optimizer step, unless it accumulates)."""

    def before_optimizer_step(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """In ``on_before_optimizer_step``."""

    def close(self) -> None:
        """At teardown: stop anything running."""


class SingleProcess(Placement):
    """Defend ``.grad`` before the optimizer step (one stream, optionally drawn ahead)."""

    name = "single"

    def __init__(self, defense: InPlaceDefense, *, draw_noise_ahead: bool = True) -> None:
        super().__init__(defense, draw_noise_ahead=draw_noise_ahead)
        self.ahead = NoiseAhead(defense.transforms)
        self.ahead_params: list[nn.Parameter] = []
        self._owned: dict[int, set[int]] = {}

    def on_train_start(self, trainer: L.Trainer) -> None:
        """Choose the parameters whose noise is drawn ahead (``[]``: drawn in the hook)."""
        self.ahead_params = self._noise_ahead_params(trainer)

    def _noise_ahead_params(self, trainer: L.Trainer) -> list[nn.Parameter]:
        if (
            not self.draw_noise_ahead
            or not can_draw_noise_ahead(self.defense.transforms)
            or len(trainer.optimizers) != 1
        ):
            return []
        owned = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        params = [p for p in self.params.values() if p.requires_grad and id(p) in owned]
        return params if params and all(p.device.type == "cpu" for p in params) else []

    def on_train_batch_start(self, trainer: L.Trainer) -> None:
        """Start drawing this step's noise (once per optimizer step, also under accumulation)."""
        if self.ahead_params:
            assert self.defense.seed is not None  # set in setup
            step = trainer.global_step
            key = noise_key(step, self.ahead_params, self.ahead_params)
            self.ahead.start(key, self.ahead_params, seed=derive_seed(self.defense.seed, 0, step))

    def on_train_batch_end(self, trainer: L.Trainer) -> None:
        """Discard a draw the step did not use, unless an accumulating step still needs it."""
        if self.ahead_params and not internals.accumulating(trainer):
            self.ahead.drop()

    def before_optimizer_step(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Defend the ``.grad`` of the selected parameters this optimizer owns."""
        owned = self._owned.get(id(optimizer))
        if owned is None:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._owned[id(optimizer)] = owned
        params = [p for p in self.params.values() if p.grad is not None and id(p) in owned]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        scale = 1.0
        if self.scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scale = float(self.scaler.get_scale())  # fused optimizers unscale in step()
        step = trainer.global_step
        noise = self.ahead.take(noise_key(step, params, grads))
        generator = self.defense.generator(grads[0].device, stream=0, step=step)
        self.defense.defend(grads, generator, scale=scale, noise=noise)

    def close(self) -> None:
        """Stop the background thread."""
        self.ahead.close()
        self.ahead_params = []


class Aggregate(SingleProcess):
    """Defend the averaged gradient after DDP's all-reduce, identically on every rank."""

    name = "aggregate"

    def attach(self, trainer: L.Trainer, params: dict[str, nn.Parameter]) -> None:
        """Agree on rank 0's seed, so every replica draws the same noise."""
        super().attach(trainer, params)
        self.defense.seed = int(trainer.strategy.broadcast(self.defense.seed, src=0) or 0)


class LocalCommHook(Placement):
    """Defend each rank's local gradient in a DDP communication hook, before the all-reduce.

    Global-view pipelines (clipping, global top-k) keep every bucket (returning a pending future
    for each) until the last one arrives, defend the whole local gradient, then all-reduce.
    """

    name = "local"

    def __init__(self, defense: InPlaceDefense, *, draw_noise_ahead: bool = True) -> None:
        super().__init__(defense, draw_noise_ahead=False)  # drawn per bucket, in the hook
        self.global_view = any(t.needs_global_view for t in defense.transforms)
        self.rank, self.world_size, self.step = 0, 1, 0
        self._ids: set[int] = set()
        self._pending: list[tuple[Tensor, list[Tensor], torch.futures.Future[Tensor]]] = []
        self._generator: torch.Generator | None = None

    def attach(self, trainer: L.Trainer, params: dict[str, nn.Parameter]) -> None:
        """Agree on the seed, then register the hook on ``trainer.strategy.model``."""
        super().attach(trainer, params)
        self.defense.seed = int(trainer.strategy.broadcast(self.defense.seed, src=0) or 0)
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        self._ids = {id(p) for p in params.values()}
        self._pending = []
        model = trainer.strategy.model
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "Expected `trainer.strategy.model` to be a DistributedDataParallel module for "
                f"placement='local', but got {type(model).__name__}."
            )
        try:
            model.register_comm_hook(state=None, hook=self.comm_hook)
        except RuntimeError as err:
            raise RuntimeError(
                "GradientDefense(placement='local') registers its own DDP communication hook, but "
                "the DDP module already has one (e.g. DDPStrategy(ddp_comm_hook=...)). DDP allows "
                "one hook per module: drop the strategy's hook or use placement='aggregate'."
            ) from err

    def on_train_batch_start(self, trainer: L.Trainer) -> None:
        """Remember the optimizer step the coming buckets belong to."""
        self.step = trainer.global_step

    # No annotations on purpose: DDP compares them with `dist.GradBucket` and
    # `Future[Tensor]` objects, and postponed (string) annotations would fail that check.
    def comm_hook(self, state, bucket):
        """DDP communication hook: defend this rank's bucket, divide by world size, all-reduce.

        ``bucket`` is a ``torch.distributed.GradBucket``; returns a ``Future[Tensor]``.
        """
        return self.defend_bucket(bucket)

    def defend_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        """Defend one bucket (or keep it until the last one, for a global view)."""
        chosen = [
            g
            for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True)
            if id(p) in self._ids
        ]
        buffer = bucket.buffer()
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        if not self.global_view:
            if bucket.index() == 0 or self._generator is None:
                self._generator = self._stream(buffer.device)
            self.defense.defend(chosen, self._generator, scale=scale)
            return self._allreduce(buffer)
        future: torch.futures.Future[Tensor] = torch.futures.Future()
        self._pending.append((buffer, chosen, future))
        if not bucket.is_last():
            return future
        pending, self._pending = self._pending, []
        grads = [g for _, gs, _ in pending for g in gs]
        self.defense.defend(grads, self._stream(buffer.device), scale=scale)
        for buf, _, fut in pending[:-1]:
            self._allreduce(buf).then(_completer(fut))
        return self._allreduce(pending[-1][0])

    def _stream(self, device: torch.device) -> torch.Generator:
        return self.defense.generator(device, stream=1 + self.rank, step=self.step)

    def _allreduce(self, buffer: Tensor) -> torch.futures.Future[Tensor]:
        buffer.div_(self.world_size)
        work = dist.all_reduce(buffer, async_op=True)
        assert work is not None  # async_op=True always returns a Work
        return work.get_future().then(lambda f: f.value()[0])


def _completer(target: torch.futures.Future[Tensor]) -> Any:
    def complete(done: torch.futures.Future[Tensor]) -> None:
        target.set_result(done.value())

    return complete


PLACEMENTS: dict[str, type[Placement]] = {
    cls.name: cls for cls in (SingleProcess, Aggregate, LocalCommHook)
}


def placement_for(
    name: str, defense: InPlaceDefense, *, draw_noise_ahead: bool = True
) -> Placement:
    """The placement object for a resolved placement name (``single``, ``local``, ``aggregate``)."""
    return PLACEMENTS[name](defense, draw_noise_ahead=draw_noise_ahead)
