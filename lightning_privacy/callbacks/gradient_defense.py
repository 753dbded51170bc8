"""``GradientDefense``: apply gradient defenses inside any Lightning ``Trainer``.

Which gradient is defended (the threat model):

* **Single process** (``placement="single"``): in ``on_before_optimizer_step``, i.e. after
  gradient accumulation and fp16 unscaling, before the Trainer's own gradient clipping and the
  optimizer. The update the optimizer applies is computed from the defended gradient.
* **DDP, ``placement="local"``** (the ``"auto"`` choice under DDP): what *leaves each rank* is
  defended. A DDP communication hook, registered by this callback on ``trainer.strategy.model``
  in ``on_fit_start``, transforms the rank's local (accumulated) gradient before the all-reduce,
  with independent randomness on every rank, then averages. Under fp16 with a ``GradScaler`` the
  hook sees scaled gradients: it unscales, defends and rescales, so noise and clipping thresholds
  are in true gradient units. Transforms with a global view (``GradientClipping``, global
  ``MagnitudePruning``) wait for the last bucket and then defend the whole local gradient at once.
* **DDP, ``placement="aggregate"``**: the averaged gradient is defended after the all-reduce, in
  ``on_before_optimizer_step``, with identical randomness on every rank (the seed is broadcast
  from rank 0), so the replicas stay identical. This is the trusted-aggregator view: the
  gradients on the wire are *not* defended.

Randomness: one stream per (seed, rank, optimizer step) -- the generator is re-seeded from a hash
of the three, so a run resumed from a checkpoint (which stores the seed) continues the exact
stream, and ranks are independent under ``local`` and identical under ``aggregate``. With
``single``/``aggregate`` on CPU the noise of ``GaussianNoise``/``LaplaceNoise`` is drawn from that
stream in a background thread while the step's forward and backward passes run
(``draw_noise_ahead``), bitwise the noise the hook would draw, and only added in the hook.

Guarantee: none of the transforms is differentially private on its own. The pipeline
``[GradientClipping(max_norm=C), GaussianNoise(std=sigma * C)]`` applied to all parameters is a
Gaussian mechanism on the batch gradient with sensitivity ``2C`` per example and epoch (each
example is in one batch per epoch); for it the callback reports ``privacy/epsilon`` through
``lightning_privacy.accountants.BatchClippingAccountant`` and can stop at ``max_epsilon``.
Every other pipeline says once that it has no formal guarantee.

Logged keys (per optimizer step; under ``local`` they describe rank 0's local gradient):
``defense/grad_norm`` (L2 norm before the defense), ``defense/perturbation_norm``
(``||defended - original||``), ``defense/sparsity`` (fraction of zero entries after the defense,
only with pruning); per epoch with the formal pipeline: ``privacy/epsilon``, ``privacy/delta``.

Example:
    >>> import lightning as L
    >>> from lightning_privacy.data import DigitsDataModule
    >>> from lightning_privacy.defenses import GaussianNoise, GradientClipping
    >>> from lightning_privacy.models import LeNetDLG, LitClassifier
    >>> defense = GradientDefense([GradientClipping(max_norm=1.0), GaussianNoise(std=2.0)], seed=0)
    >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0,
    ...                     callbacks=[defense], logger=False, enable_progress_bar=False,
    ...                     enable_checkpointing=False, enable_model_summary=False)
    >>> module = LitClassifier(LeNetDLG(num_classes=10, channels=1, image_size=16), lr=0.1)
    >>> trainer.fit(module, DigitsDataModule(image_size=16, batch_size=16))
    >>> defense.placement, "defense/perturbation_norm" in trainer.callback_metrics
    ('single', True)
    >>> epsilon = trainer.callback_metrics["privacy/epsilon"].item()  # one epoch, sigma = 2
    >>> 1.0 < epsilon < 10.0
    True
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Generator, Tensor, nn

from lightning_privacy._validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    describe,
)
from lightning_privacy.callbacks._noise_ahead import NoiseAhead, noise_key
from lightning_privacy.defenses.base import (
    DrawnNoise,
    GradientTransform,
    apply_transforms,
    can_draw_noise_ahead,
)
from lightning_privacy.defenses.transforms import (
    GaussianNoise,
    GradientClipping,
    MagnitudePruning,
    RandomPruning,
)
from lightning_privacy.functional.defenses import global_norm
from lightning_privacy.functional.gradients import select_parameters

__all__ = ["GradientDefense"]

PLACEMENTS = ("auto", "single", "local", "aggregate")
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, stream: int, step: int) -> int:
    """A 63-bit seed for ``(seed, stream, step)``: distinct inputs give unrelated streams.

    Example:
        >>> derive_seed(0, 1, 5) == derive_seed(0, 1, 5)
        True
        >>> derive_seed(0, 1, 5) == derive_seed(0, 2, 5)
        False
    """
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ (stream & _MASK64))
    x = _splitmix64(x ^ (step & _MASK64))
    return x >> 1


class GradientDefense(Callback):
    r"""Defend the gradient of every optimizer step with a pipeline of gradient transforms.

    Args:
        transforms: One :class:`~lightning_privacy.defenses.GradientTransform` or a sequence,
            applied in order (e.g. ``[GradientClipping(max_norm=1.0), GaussianNoise(std=0.01)]``).
        placement: ``"auto"`` (``"single"`` in one process, ``"local"`` under DDP), ``"local"``
            (each rank's gradient before the all-reduce) or ``"aggregate"`` (the averaged
            gradient after it). In a single process every placement means ``"single"``.
        layers: Restrict the defense to parameters whose names match: a regex (``re.search``)
            or a list of regexes; ``None`` defends all trainable parameters. A pattern that
            matches nothing is an error.
        seed: Seed of the defense's random streams; ``None`` draws one on rank 0 (stored in
            checkpoints).
        max_epsilon: Stop training before epsilon would exceed this (only with the formal
            pipeline ``[GradientClipping(max_norm=C), GaussianNoise(std=sigma * C)]``).
        target_delta: The delta of the reported epsilon; default ``1 / (10 N)`` with ``N`` the
            training-set size. Only used with the formal pipeline.
        draw_noise_ahead: Draw the noise of ``GaussianNoise``/``LaplaceNoise`` for each step in a
            background thread from the start of the step's first batch, so that it overlaps
            with the forward and backward passes (CPU parameters, placements ``"single"`` and
            ``"aggregate"``, one optimizer, no other random transform). The noise is bitwise
            the one drawn in the hook; ``False`` draws it in the hook.

    Attributes:
        transforms: The pipeline, a tuple.
        layers: The ``layers`` argument.
        placement: The requested placement; after ``setup`` the resolved one
            (``"single"``, ``"local"`` or ``"aggregate"``).
        seed: The ``seed`` argument.
        formal: ``(max_norm, std)`` of the formal pipeline, or ``None``.

    Raises:
        TypeError: For transforms that are not ``GradientTransform`` or ill-typed settings.
        ValueError: For invalid settings, ``max_epsilon`` without the formal pipeline, and (at
            ``setup``/``on_fit_start``) unsupported strategies or ``layers`` matching nothing.

    Example:
        >>> from lightning_privacy.defenses import MagnitudePruning
        >>> defense = GradientDefense(MagnitudePruning(ratio=0.9), layers=r"^model\.fc\.")
        >>> defense.transforms, defense.placement, defense.formal
        ((MagnitudePruning(ratio=0.9, scope='per_tensor'),), 'auto', None)
    """

    def __init__(
        self,
        transforms: GradientTransform | Sequence[GradientTransform],
        *,
        placement: str = "auto",
        layers: str | Sequence[str] | None = None,
        seed: int | None = None,
        max_epsilon: float | None = None,
        target_delta: float | None = None,
        draw_noise_ahead: bool = True,
    ) -> None:
        super().__init__()
        self.transforms: tuple[GradientTransform, ...] = _check_transforms(transforms)
        self.placement: str = check_choice("placement", placement, PLACEMENTS)
        self.layers = _check_layers(layers)
        self.seed = None if seed is None else check_int("seed", seed, low=0)
        self.max_epsilon = (
            None if max_epsilon is None else check_float("max_epsilon", max_epsilon, low=0.0)
        )
        self.target_delta = (
            None
            if target_delta is None
            else check_float(
                "target_delta", target_delta, low=0.0, high=1.0, low_open=True, high_open=True
            )
        )
        self.draw_noise_ahead = check_bool("draw_noise_ahead", draw_noise_ahead)
        self.formal = self._formal_pipeline()
        if self.max_epsilon is not None and self.formal is None:
            raise ValueError(
                "Expected the pipeline [GradientClipping(max_norm=C), GaussianNoise(std>0)] on all "
                "parameters (layers=None) with `max_epsilon`, because only that pipeline has a "
                f"computable epsilon, but got transforms={list(self.transforms)!r} and "
                f"layers={self.layers!r}. Drop `max_epsilon` or use the DPSGD callback."
            )
        self._requested_placement = self.placement
        self._base_seed: int | None = self.seed
        self._world_size = 1
        self._rank = 0
        self._selected: dict[str, nn.Parameter] = {}
        self._selected_ids: set[int] = set()
        self._optimizer_params: dict[int, set[int]] = {}
        self._generators: dict[torch.device, Generator] = {}
        self._scaler: Any = None
        self._trainer: L.Trainer | None = None
        self._global_view = any(t.needs_global_view for t in self.transforms)
        self._prunes = any(
            isinstance(t, (MagnitudePruning, RandomPruning)) for t in self.transforms
        )
        self._pending: list[tuple[Tensor, list[Tensor], torch.futures.Future[Tensor]]] = []
        self._stats: dict[str, Tensor] = {}
        self._local_gen: Generator | None = None
        self._accountant: Any = None
        self._accountant_state: dict[str, Any] | None = None
        self._delta: float | None = None
        self._ahead = NoiseAhead(self.transforms)
        self._ahead_params: list[nn.Parameter] = []

    # ------------------------------------------------------------------ configuration
    def _formal_pipeline(self) -> tuple[float, float] | None:
        t = self.transforms
        if (
            self.layers is None
            and len(t) == 2
            and type(t[0]) is GradientClipping
            and type(t[1]) is GaussianNoise
            and t[1].std > 0
        ):
            return t[0].max_norm, t[1].std
        return None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the strategy, resolve the placement, draw the seed (Trainer-dependent checks)."""
        if stage != "fit":
            return
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(
            strategy, (DDPStrategy, SingleDeviceStrategy)
        ):
            raise ValueError(
                "GradientDefense supports single-device training (SingleDeviceStrategy) and "
                "DDP (DDPStrategy: strategy='ddp', 'ddp_spawn', 'ddp_fork', ...), but the Trainer "
                f"uses {type(strategy).__name__}. FSDP, DeepSpeed and model-parallel strategies "
                "shard the gradient and are not supported yet: use strategy='ddp'."
            )
        distributed = isinstance(strategy, DDPStrategy)
        self._world_size = trainer.world_size
        self._rank = trainer.global_rank
        requested = self._requested_placement
        if not distributed:
            self.placement = "single"
            if requested in ("local", "aggregate"):
                rank_zero_info(
                    f"GradientDefense: placement={requested!r} means 'single' in one process."
                )
        else:
            self.placement = "local" if requested in ("auto", "single") else requested
        if trainer.gradient_clip_val is not None:
            rank_zero_warn(
                "GradientDefense: the Trainer's `gradient_clip_val` clips *after* the defense "
                "(it runs after `on_before_optimizer_step`) and changes what the optimizer sees. "
                "Use `GradientClipping(max_norm=...)` as the first transform instead."
            )
        if self._base_seed is None:
            self._base_seed = secrets.randbits(62)
        self._trainer = trainer

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Select parameters, agree on the seed, register the DDP communication hook."""
        self._selected = select_parameters(pl_module, self.layers)
        self._selected_ids = {id(p) for p in self._selected.values()}
        self._optimizer_params = {}
        self._pending = []
        self._stats = {}
        precision = trainer.precision_plugin
        scaler = getattr(precision, "scaler", None)
        self._scaler = scaler if scaler is not None and scaler.is_enabled() else None
        if self.placement != "single":
            self._base_seed = int(trainer.strategy.broadcast(self._base_seed, src=0) or 0)
        if self.placement == "local":
            self._register_comm_hook(trainer.strategy.model)
        if self.formal is None:
            rank_zero_info(
                "GradientDefense: this pipeline has no formal privacy guarantee (no epsilon is "
                "reported); only [GradientClipping(max_norm=C), GaussianNoise(std=sigma*C)] on all "
                "parameters is a Gaussian mechanism with a computable epsilon."
            )

    def _register_comm_hook(self, model: Any) -> None:
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "Expected `trainer.strategy.model` to be a DistributedDataParallel module for "
                f"placement='local', but got {type(model).__name__}."
            )
        try:
            model.register_comm_hook(state=None, hook=self._comm_hook)
        except RuntimeError as err:
            raise RuntimeError(
                "GradientDefense(placement='local') registers its own DDP communication hook, but "
                "the DDP module already has one (e.g. DDPStrategy(ddp_comm_hook=...)). DDP allows "
                "one hook per module: drop the strategy's hook or use placement='aggregate'."
            ) from err

    # ------------------------------------------------------------------ randomness
    def _generator(self, device: torch.device, stream: int, step: int) -> Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        assert self._base_seed is not None  # set in setup
        gen.manual_seed(derive_seed(self._base_seed, stream, step))
        return gen

    def _step(self) -> int:
        return self._trainer.global_step if self._trainer is not None else 0

    # ------------------------------------------------------------------ the defense
    def _defend(
        self,
        grads: list[Tensor],
        generator: Generator,
        scale: float = 1.0,
        noise: DrawnNoise | None = None,
    ) -> None:
        """Transform ``grads`` in place (they may be bucket views) and record statistics."""
        if not grads:
            return
        originals = grads if scale == 1.0 else [g / scale for g in grads]
        defended = apply_transforms(self.transforms, originals, generator=generator, noise=noise)
        grad_sq = global_norm(originals).square()
        # The originals are overwritten below, so they can hold `original - defended` in place
        # (no copy of the whole gradient); a transform that returned its input changed nothing.
        changed = [
            g.sub_(d) for g, d in zip(originals, defended, strict=True) if not _aliases(d, g)
        ]
        self._record(grad_sq, global_norm(changed).square(), defended)
        for g, d in zip(grads, defended, strict=True):
            if not _aliases(d, g):
                g.copy_(d if scale == 1.0 else d * scale)

    def _record(self, grad_sq: Tensor, pert_sq: Tensor, defended: list[Tensor]) -> None:
        f32 = torch.float32
        stats = {"grad_sq": grad_sq, "pert_sq": pert_sq}
        if self._prunes:
            stats["zeros"] = sum((d == 0).sum() for d in defended).to(f32)  # type: ignore[union-attr]
            stats["numel"] = torch.tensor(float(sum(d.numel() for d in defended)))
        for key, value in stats.items():
            self._stats[key] = self._stats[key] + value if key in self._stats else value

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Defend ``.grad`` (``single``/``aggregate``) and log the step's statistics."""
        if self.placement in ("single", "aggregate"):
            owned = self._optimizer_params.get(id(optimizer))
            if owned is None:
                owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
                self._optimizer_params[id(optimizer)] = owned
            params = [p for p in self._selected.values() if p.grad is not None and id(p) in owned]
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                scale = 1.0
                if self._scaler is not None and getattr(
                    optimizer, "_step_supports_amp_scaling", False
                ):
                    scale = float(self._scaler.get_scale())  # fused optimizers unscale in step()
                noise = self._ahead.take(noise_key(trainer.global_step, params, grads))
                gen = self._generator(grads[0].device, stream=0, step=trainer.global_step)
                self._defend(grads, gen, scale, noise)
        self._log_stats(pl_module)

    def _log_stats(self, pl_module: L.LightningModule) -> None:
        stats, self._stats = self._stats, {}
        if not stats:
            return
        pl_module.log("defense/grad_norm", stats["grad_sq"].sqrt(), on_step=True, on_epoch=False)
        pl_module.log(
            "defense/perturbation_norm", stats["pert_sq"].sqrt(), on_step=True, on_epoch=False
        )
        if "zeros" in stats:
            sparsity = stats["zeros"].cpu() / stats["numel"]
            pl_module.log("defense/sparsity", sparsity, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ DDP communication hook
    # No annotations on purpose: DDP compares them with `dist.GradBucket` and
    # `Future[Tensor]` objects, and postponed (string) annotations would fail that check.
    def _comm_hook(self, state, bucket):  # type: ignore[no-untyped-def]
        """DDP communication hook: defend this rank's bucket, divide by world size, all-reduce.

        ``bucket`` is a ``torch.distributed.GradBucket``; returns a ``Future[Tensor]``.

        Global-view pipelines keep the buckets (returning a pending future per bucket) until the
        last one arrives, defend the whole local gradient, then all-reduce every bucket.
        """
        return self._defend_bucket(bucket)

    def _defend_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        chosen = [
            g
            for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True)
            if id(p) in self._selected_ids
        ]
        buffer = bucket.buffer()
        scale = float(self._scaler.get_scale()) if self._scaler is not None else 1.0
        stream = 1 + self._rank
        if not self._global_view:
            if bucket.index() == 0 or self._local_gen is None:
                self._local_gen = self._generator(buffer.device, stream, self._step())
            self._defend(chosen, self._local_gen, scale)
            return self._allreduce(buffer)
        future: torch.futures.Future[Tensor] = torch.futures.Future()
        self._pending.append((buffer, chosen, future))
        if not bucket.is_last():
            return future
        pending, self._pending = self._pending, []
        grads = [g for _, gs, _ in pending for g in gs]
        self._defend(grads, self._generator(buffer.device, stream, self._step()), scale)
        for buf, _, fut in pending[:-1]:
            self._allreduce(buf).then(_completer(fut))
        return self._allreduce(pending[-1][0])

    def _allreduce(self, buffer: Tensor) -> torch.futures.Future[Tensor]:
        buffer.div_(self._world_size)
        work = dist.all_reduce(buffer, async_op=True)
        assert work is not None  # async_op=True always returns a Work
        return work.get_future().then(lambda f: f.value()[0])

    # ------------------------------------------------------------------ noise drawn ahead
    def _noise_ahead_params(self, trainer: L.Trainer) -> list[nn.Parameter]:
        """The parameters whose noise is drawn ahead, or ``[]`` where it is drawn in the hook."""
        if (
            not self.draw_noise_ahead
            or self.placement == "local"
            or not can_draw_noise_ahead(self.transforms)
            or len(trainer.optimizers) != 1
        ):
            return []
        owned = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        params = [p for p in self._selected.values() if p.requires_grad and id(p) in owned]
        return params if params and all(p.device.type == "cpu" for p in params) else []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Start drawing this step's noise (once per optimizer step, also under accumulation)."""
        if self._ahead_params:
            assert self._base_seed is not None  # set in setup
            step = trainer.global_step
            key = noise_key(step, self._ahead_params, self._ahead_params)
            self._ahead.start(key, self._ahead_params, seed=derive_seed(self._base_seed, 0, step))

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Discard a draw the step did not use, unless an accumulating step still needs it."""
        if self._ahead_params and not _accumulating(trainer):
            self._ahead.drop()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Stop the background thread."""
        self._ahead.close()
        self._ahead_params = []

    # ------------------------------------------------------------------ privacy accounting
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Prepare noise drawn ahead; build the formal pipeline's accountant (needs the data)."""
        self._ahead_params = self._noise_ahead_params(trainer)
        if self.formal is None:
            return
        from lightning_privacy.accountants import BatchClippingAccountant

        max_norm, std = self.formal
        self._accountant = BatchClippingAccountant(max_grad_norm=max_norm, std=std)
        if self._accountant_state is not None:
            self._accountant.load_state_dict(self._accountant_state)
            self._accountant_state = None
        delta = self.target_delta
        if delta is None:
            size = _dataset_size(trainer)
            if size is None:
                raise ValueError(
                    "GradientDefense could not find the training-set size N for the default "
                    "`target_delta = 1 / (10 N)`: pass `target_delta=` explicitly."
                )
            delta = 1.0 / (10 * size)
        self._delta = delta
        if self.max_epsilon is not None and self._projected_epsilon() > self.max_epsilon:
            raise ValueError(
                f"Expected `max_epsilon` to allow at least one more epoch, but one epoch of "
                f"GradientClipping(max_norm={max_norm}) + GaussianNoise(std={std}) already spends "
                f"epsilon={self._projected_epsilon():.4g} > {self.max_epsilon} at "
                f"delta={delta:.3g}. Increase the noise std or `max_epsilon`."
            )

    def _projected_epsilon(self) -> float:
        """Epsilon after one more epoch."""
        assert self._accountant is not None and self._delta is not None
        ahead = type(self._accountant)(
            max_grad_norm=self._accountant.max_grad_norm, std=self._accountant.std
        )
        ahead.load_state_dict(self._accountant.state_dict())
        ahead.step(epochs=1)
        return float(ahead.get_epsilon(self._delta))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Account one epoch, log ``privacy/epsilon`` and ``privacy/delta``, stop at the budget."""
        if self._accountant is None or self._delta is None:
            return
        self._accountant.step(epochs=1)
        epsilon = float(self._accountant.get_epsilon(self._delta))
        pl_module.log("privacy/epsilon", epsilon, on_step=False, on_epoch=True, sync_dist=True)
        pl_module.log("privacy/delta", self._delta, on_step=False, on_epoch=True, sync_dist=True)
        if self.max_epsilon is None:
            return
        projected = self._projected_epsilon()
        stop = trainer.strategy.reduce_boolean_decision(projected > self.max_epsilon, all=False)
        if stop and not trainer.should_stop:
            trainer.should_stop = True
            rank_zero_info(
                f"GradientDefense: stopping after epoch {trainer.current_epoch}: epsilon is "
                f"{epsilon:.4g} and one more epoch would reach {projected:.4g} > max_epsilon="
                f"{self.max_epsilon} (delta={self._delta:.3g})."
            )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The seed of the random streams (streams are keyed by seed, rank and step)."""
        state: dict[str, Any] = {"seed": self._base_seed}
        if self._accountant is not None:
            state["accountant"] = self._accountant.state_dict()
        elif self._accountant_state is not None:
            state["accountant"] = self._accountant_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the seed (and accountant history) so a resumed run continues its streams."""
        if state_dict.get("seed") is not None:
            self._base_seed = int(state_dict["seed"])
        self._accountant_state = state_dict.get("accountant")


def _aliases(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors start at the same memory (a transform returned its input)."""
    return a.data_ptr() == b.data_ptr()


def _accumulating(trainer: L.Trainer) -> bool:
    """Whether the batch that just ended was not the last one of its optimizer step."""
    epoch_loop = trainer.fit_loop.epoch_loop
    return bool(getattr(epoch_loop, "_should_accumulate", lambda: False)())


def _dataset_size(trainer: L.Trainer) -> int | None:
    loader = trainer.train_dataloader
    if isinstance(loader, (list, tuple)) and len(loader) == 1:
        loader = loader[0]
    try:
        return len(loader.dataset)  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError):
        return None


def _completer(
    target: torch.futures.Future[Tensor],
) -> Any:
    def complete(done: torch.futures.Future[Tensor]) -> None:
        target.set_result(done.value())

    return complete


def _check_transforms(
    transforms: GradientTransform | Sequence[GradientTransform],
) -> tuple[GradientTransform, ...]:
    items = (transforms,) if isinstance(transforms, GradientTransform) else transforms
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(
            "Expected `transforms` to be a GradientTransform or a sequence of them, "
            f"but got {describe(transforms)}."
        )
    out = tuple(items)
    if not out:
        raise ValueError(
            "Expected `transforms` to hold at least one GradientTransform, but got []."
        )
    for i, t in enumerate(out):
        if not isinstance(t, GradientTransform):
            raise TypeError(
                f"Expected `transforms[{i}]` to be a GradientTransform (e.g. "
                f"GaussianNoise(std=...)), but got {describe(t)}."
            )
    return out


def _check_layers(layers: str | Sequence[str] | None) -> str | tuple[str, ...] | None:
    if layers is None:
        return None
    patterns = [layers] if isinstance(layers, str) else layers
    if not isinstance(patterns, Sequence) or not patterns:
        raise TypeError(
            "Expected `layers` to be a regex string or a non-empty list of them, "
            f"but got {describe(layers)}."
        )
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"Expected each `layers` pattern to be a str, but got {describe(pattern)}."
            )
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(
                f"Expected `layers` to hold valid regexes, but {pattern!r}: {err}."
            ) from err
    return layers if isinstance(layers, str) else tuple(layers)
