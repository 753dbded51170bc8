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

Structure: the placement is one object (:mod:`lightning_privacy.callbacks._placements`), chosen
in ``setup``; the pipeline is applied in place by
:class:`~lightning_privacy.defenses.in_place.InPlaceDefense`; the formal pipeline is found from the
transforms' metadata (:func:`~lightning_privacy.defenses.formal_mechanism`).

Randomness: one stream per (seed, rank, optimizer step) -- the generator is re-seeded from
:func:`~lightning_privacy.functional.seeding.derive_seed` of the three, so a run resumed from a
checkpoint (which stores the seed) continues the exact stream, and ranks are independent under
``local`` and identical under ``aggregate``. With ``single``/``aggregate`` on CPU the noise of
``GaussianNoise``/``LaplaceNoise`` is drawn from that stream in a background thread while the step's
forward and backward passes run (``draw_noise_ahead``), bitwise the noise the hook would draw, and
only added in the hook.

Guarantee: none of the transforms is differentially private on its own. A pipeline with
``GradientClipping(max_norm=C)`` immediately followed by ``GaussianNoise(std=sigma * C)`` (what
comes before the clipping cannot raise its bound, what comes after the noise is post-processing),
applied to all parameters, is a Gaussian mechanism on the batch gradient with sensitivity ``2C``
per release; for it the callback reports ``privacy/epsilon`` through
``lightning_privacy.accountants.BatchClippingAccountant`` and can stop at ``max_epsilon``. The ε
composes every release one example takes part in per epoch: the defended optimizer steps of its
batch (one in automatic optimization; each step of each optimizer in a manual ``training_step``)
times the batches the sampler can draw it into per epoch (one for a shuffle without replacement;
with replacement every release of the epoch counts) -- see
:mod:`~lightning_privacy.callbacks._releases`; what was assumed is logged at the start and
whenever an epoch releases an example more than once. ``target_delta`` must be below ``1 / N``.
Every other pipeline says once that it has no formal guarantee.

Manual optimization is defended when ``training_step`` steps the optimizers Lightning wraps
(``self.optimizers()``); a step of the raw optimizer (``use_pl_optimizer=False``) bypasses
``on_before_optimizer_step`` and is refused with an error before its update is applied (with
``placement="local"`` the communication hook defends it anyway).

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

import math
import re
import secrets
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_privacy._validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    describe,
)
from lightning_privacy.accountants import BatchClippingAccountant
from lightning_privacy.callbacks._budget import EpsilonBudget
from lightning_privacy.callbacks._placements import Placement, placement_for
from lightning_privacy.callbacks._releases import RawStepGuard, ReleaseCounter, draws_per_epoch
from lightning_privacy.defenses.base import FormalMechanism, GradientTransform, formal_mechanism
from lightning_privacy.defenses.in_place import InPlaceDefense
from lightning_privacy.functional.accounting import check_delta_for_dataset
from lightning_privacy.functional.gradients import select_parameters
from lightning_privacy.functional.seeding import derive_seed

__all__ = ["GradientDefense", "derive_seed"]

PLACEMENTS = ("auto", "single", "local", "aggregate")


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
            training-set size; must be ``< 1 / N`` (checked before the first step). Only used with
            the formal pipeline.
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
        formal: The :class:`~lightning_privacy.defenses.FormalMechanism` ``(max_norm, std)``
            of the formal pipeline, or ``None``.

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
        self.formal: FormalMechanism | None = (
            formal_mechanism(self.transforms) if self.layers is None else None
        )
        if self.max_epsilon is not None and self.formal is None:
            raise ValueError(
                "Expected the pipeline [GradientClipping(max_norm=C), GaussianNoise(std>0)] on all "
                "parameters (layers=None) with `max_epsilon`, because only that pipeline has a "
                f"computable epsilon, but got transforms={list(self.transforms)!r} and "
                f"layers={self.layers!r}. Drop `max_epsilon` or use the DPSGD callback."
            )
        self._requested_placement = self.placement
        self._defense = InPlaceDefense(self.transforms, seed=self.seed)
        self._placement: Placement | None = None
        self.budget = EpsilonBudget("GradientDefense", self.max_epsilon)
        self._accountant: BatchClippingAccountant | None = None
        self._accountant_state: dict[str, Any] | None = None
        self._delta: float | None = None
        self._releases = ReleaseCounter(draws=1)
        self._guard = RawStepGuard("GradientDefense")
        self._said_releases: int | None = None

    @property
    @override
    def state_key(self) -> str:
        """One GradientDefense per Trainer, one key: a resumed run continues its streams and ε."""
        return "GradientDefense"

    # ------------------------------------------------------------------ configuration
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the strategy, resolve the placement, draw the seed (Trainer-dependent checks)."""
        if stage != "fit":
            return
        distributed = _check_strategy(trainer.strategy)
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
        if self._defense.seed is None:
            self._defense.seed = secrets.randbits(62)
        self._placement = placement_for(
            self.placement, self._defense, draw_noise_ahead=self.draw_noise_ahead
        )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Select the parameters, let the placement attach (seed broadcast, DDP comm hook)."""
        self._require_placement().attach(trainer, select_parameters(pl_module, self.layers))
        if self.formal is None:
            rank_zero_info(
                "GradientDefense: this pipeline has no formal privacy guarantee (no epsilon is "
                "reported); only [GradientClipping(max_norm=C), GaussianNoise(std=sigma*C)] on all "
                "parameters is a Gaussian mechanism with a computable epsilon."
            )

    def _require_placement(self) -> Placement:
        if self._placement is None:
            raise RuntimeError("GradientDefense.setup() must run before training hooks.")
        return self._placement

    # ------------------------------------------------------------------ per step
    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Start the step (noise drawn ahead; the step the comm hook's buckets belong to)."""
        self._require_placement().on_train_batch_start(trainer)
        self._releases.batch_start()
        self._guard.reset()

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Discard a draw the step did not use, unless an accumulating step still needs it."""
        self._require_placement().on_train_batch_end(trainer)
        self._releases.batch_end()

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Defend ``.grad`` (``single``/``aggregate``) and log the step's statistics."""
        self._require_placement().before_optimizer_step(trainer, optimizer)
        self._guard.defended(optimizer)
        self._releases.release()
        stats = self._defense.pop_statistics()
        if not stats:
            return
        pl_module.log("defense/grad_norm", stats["grad_sq"].sqrt(), on_step=True, on_epoch=False)
        pl_module.log(
            "defense/perturbation_norm", stats["pert_sq"].sqrt(), on_step=True, on_epoch=False
        )
        if "zeros" in stats:
            sparsity = stats["zeros"].cpu() / stats["numel"]
            pl_module.log("defense/sparsity", sparsity, on_step=True, on_epoch=False)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Stop the background thread; remove the optimizers' step hooks."""
        self._guard.detach()
        if self._placement is not None:
            self._placement.close()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Clean up as in ``teardown`` (Lightning skips teardown hooks on exceptions)."""
        self.teardown(trainer, pl_module, "fit")

    # ------------------------------------------------------------------ privacy accounting
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Prepare noise drawn ahead; build the formal pipeline's accountant (needs the data)."""
        self._require_placement().on_train_start(trainer)
        if self.placement != "local":  # the comm hook defends whatever steps the optimizer
            self._guard.attach(list(trainer.optimizers))
        if self.formal is None:
            return
        max_norm, std = self.formal
        self._accountant = BatchClippingAccountant(max_grad_norm=max_norm, std=std)
        if self._accountant_state is not None:
            self._accountant.load_state_dict(self._accountant_state)
            self._accountant_state = None
        self._delta = _delta(trainer, self.target_delta)
        draws, why = draws_per_epoch(_train_loader(trainer))
        self._releases = ReleaseCounter(draws=draws)
        rank_zero_info(
            f"GradientDefense: ε counts one Gaussian mechanism per defended optimizer step for the "
            f"examples of its batch, and the sampler is {why}; epochs compose (RDP)."
        )
        self.budget.check_first_release(
            epsilon_after=self._accountant.epsilon_after(
                self._delta, epochs=1, releases_per_epoch=self._predicted_releases(trainer)
            ),
            delta=self._delta,
            fix=f"GradientClipping(max_norm={max_norm}) + GaussianNoise(std={std}): increase the "
            "noise std or `max_epsilon`",
        )

    def _predicted_releases(self, trainer: L.Trainer) -> int:
        """Releases per example of the coming epoch (the last epoch's once there was one)."""
        batches = trainer.num_training_batches
        accumulate = max(1, trainer.accumulate_grad_batches)
        steps = int(batches) // accumulate if math.isfinite(batches) else 1
        module = trainer.lightning_module
        per_batch = 1 if module.automatic_optimization else max(1, len(trainer.optimizers))
        return self._releases.predicted(steps_per_epoch=steps, steps_per_batch=per_batch)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Account one epoch, log ``privacy/epsilon`` and ``privacy/delta``, stop at the budget."""
        if self._accountant is None or self._delta is None:
            return
        releases = self._releases.epoch_end()
        if releases > 1 and releases != self._said_releases:
            self._said_releases = releases
            rank_zero_info(
                f"GradientDefense: in epoch {trainer.current_epoch} one example took part in up to "
                f"{releases} releases (defended optimizer steps per batch x draws per epoch); ε "
                f"composes {releases} Gaussian mechanisms for that epoch."
            )
        self._accountant.step(epochs=1, releases_per_epoch=releases)
        epsilon = float(self._accountant.get_epsilon(self._delta))
        pl_module.log("privacy/epsilon", epsilon, on_step=False, on_epoch=True, sync_dist=True)
        pl_module.log("privacy/delta", self._delta, on_step=False, on_epoch=True, sync_dist=True)
        self.budget.stop_before_exceeding(
            trainer,
            epsilon=epsilon,
            epsilon_after=self._accountant.epsilon_after(
                self._delta, epochs=1, releases_per_epoch=self._predicted_releases(trainer)
            ),
            delta=self._delta,
        )

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        """The seed of the random streams (streams are keyed by seed, rank and step)."""
        state: dict[str, Any] = {"seed": self._defense.seed}
        if self._accountant is not None:
            state["accountant"] = self._accountant.state_dict()
        elif self._accountant_state is not None:
            state["accountant"] = self._accountant_state
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the seed (and accountant history) so a resumed run continues its streams."""
        if state_dict.get("seed") is not None:
            self._defense.seed = int(state_dict["seed"])
        self._accountant_state = state_dict.get("accountant")


def _check_strategy(strategy: Any) -> bool:
    """Whether the strategy is DDP; raises for what the defense cannot serve."""
    if isinstance(strategy, DeepSpeedStrategy) or not isinstance(
        strategy, (DDPStrategy, SingleDeviceStrategy)
    ):
        raise ValueError(
            "GradientDefense supports single-device training (SingleDeviceStrategy) and "
            "DDP (DDPStrategy: strategy='ddp', 'ddp_spawn', 'ddp_fork', ...), but the Trainer "
            f"uses {type(strategy).__name__}. FSDP, DeepSpeed and model-parallel strategies "
            "shard the gradient and are not supported yet: use strategy='ddp'."
        )
    return isinstance(strategy, DDPStrategy)


def _train_loader(trainer: L.Trainer) -> Any:
    """The Trainer's train loader (the single one of a list)."""
    loader = trainer.train_dataloader
    if isinstance(loader, (list, tuple)) and len(loader) == 1:
        loader = loader[0]
    return loader


def _delta(trainer: L.Trainer, target_delta: float | None) -> float:
    """``target_delta`` checked against ``1 / N``, else the default ``1 / (10 N)``."""
    try:
        size: int | None = len(_train_loader(trainer).dataset)
    except (AttributeError, TypeError):
        size = None
    if target_delta is not None:
        return target_delta if size is None else check_delta_for_dataset(target_delta, size)
    if not size:
        raise ValueError(
            "GradientDefense could not find the training-set size N for the default "
            "`target_delta = 1 / (10 N)`: pass `target_delta=` explicitly."
        )
    return 1.0 / (10 * size)


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
