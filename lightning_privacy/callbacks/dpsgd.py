"""DP-SGD for any LightningModule, from one callback (Opacus under the hood).

``Trainer(callbacks=[DPSGD(max_grad_norm=1.0, target_epsilon=3.0)])`` trains the user's module
with Opacus's DP-SGD without changing the module:

* ``setup``: checks the Trainer (strategy, precision, accumulation, clipping, samplers) and the
  model: every layer Opacus cannot handle is collected with ``ModuleValidator`` -- plus trainable
  subclasses of BatchNorm (e.g. timm's ``BatchNormAct2d``), which Opacus's exact-type check
  misses -- and reported in one error naming the fix. ``fix_model=True`` replaces the fixable ones
  (BatchNorm -> GroupNorm, ...) in place, before the optimizer is built.
* ``on_fit_start``: one training step is rehearsed on a deep copy of the module, on the first two
  training examples, under Opacus's hooks (the module, its BatchNorm statistics, ``.grad`` and the
  global RNG stay untouched): every module that modifies a hooked layer's output in place is
  reported in one error (see *In-place ops* below). Then
  ``PrivacyEngine.make_private(module=trainer.strategy.model, wrap_model=False)`` attaches the
  per-sample-gradient hooks; the resulting ``DPOptimizer`` replaces the Trainer's
  optimizer (LR schedulers keep working: they share ``param_groups``); the train loader is
  replaced by Opacus's DP loader (Poisson sampling).
* each epoch: logs ``privacy/epsilon``, ``privacy/delta``, ``privacy/noise_multiplier`` and
  ``privacy/sample_rate``; with ``max_epsilon`` it stops training (agreed across ranks, like
  ``EarlyStopping``) before an epoch that would spend more.
* ``teardown``: removes every hook and attribute Opacus added; the module comes back clean.
* checkpoints carry the accountant history, so a resumed run reports the same ε as an
  uninterrupted one.

The mechanism and its guarantee
-------------------------------
Each step, every example of the batch is in it independently with probability ``q`` (Poisson
sampling, ``q = 1 / len(train_loader)``); its gradient is clipped to L2 norm ``max_grad_norm = C``
over all parameters; the clipped sum gets ``N(0, (z C)^2)`` noise and is divided by the expected
batch size. ``(ε, δ)`` is reported for add/remove-one adjacency by Opacus's RDP or PRV
accountant. ``poisson_sampling=False`` keeps the user's shuffled fixed-size batches; the ε is then
the usual approximation, not a proof, and the callback warns so at fit start. With
``target_epsilon`` the noise is planned for ``epochs`` (default ``max_epochs``): a Trainer that
may train longer is warned about at fit start, and the epoch whose ε passes the target is warned
about when it ends (``max_epsilon`` stops training instead).

Under DDP (what each rank sends)
--------------------------------
The Trainer needs ``use_distributed_sampler=False``; the callback builds a distributed DP loader
(each rank Poisson-samples its shard at the global rate ``q``), so the global batch and ε are as in
one process. Opacus's ``DistributedDPOptimizer`` adds the noise **on rank 0 only**: every other
rank all-reduces its clipped but *un-noised* per-sample-gradient sum. The guarantee is central DP
of the aggregate (trusted aggregation); it does not hide one rank's contribution from someone who
can read that rank's traffic. The callback registers a no-op DDP communication hook so that DDP's
own all-reduce of the *unclipped* batch gradients (which the DP optimizer would discard anyway) is
not sent at all: the only gradient traffic is Opacus's all-reduce of clipped sums.

Ghost clipping (``grad_sample_mode="ghost"``)
---------------------------------------------
Opacus's fast gradient clipping never materialises per-sample gradients but needs the
*per-sample losses*, which a mean-reduced ``training_step`` does not give. The opt-in: the
module's ``training_step`` returns the vector of per-sample losses (shape ``[batch]``, e.g.
``F.cross_entropy(logits, y, reduction="none")``), or a dict whose ``"loss"`` is that vector. The
callback then runs Lightning's backward as Opacus's two-pass ghost-clipping backward on it (the
optimised objective is the mean). A module that returns a vector also works in the other modes
(the callback back-propagates the mean) but not without ``DPSGD``. Ghost mode is single-device for
now.

In-place ops
------------
Opacus hooks every layer with trainable parameters with ``register_full_backward_hook``; PyTorch
then hands the layer's output on as a view that must not be modified in place.
``ReLU(inplace=True)`` after a conv or norm layer and torchvision's ``out += identity``
(``BasicBlock``, ``Bottleneck``) do exactly that, and the first step would fail with "Output 0 of
BackwardHookFunction is a view and is being modified inplace". The rehearsal finds them all
before training and names each module, the op and its source line. ``fix_model=True`` sets
``inplace=False`` on the modules whose own ``inplace`` flag is the cause (reported); an op in a
module's code has to be written out of place. For torchvision's ResNet-18::

    from torchvision.models.resnet import BasicBlock, ResNet

    class Block(BasicBlock):
        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)  # not `out += identity`

    net = ResNet(Block, [2, 2, 2, 2], num_classes=10)  # same layers and state_dict keys

and ``DPSGD(..., fix_model=True)`` (BatchNorm -> GroupNorm, ``inplace`` off) trains it.

Observers
---------
Opacus's hooks are attached only from ``on_train_batch_start`` to ``on_after_backward``, so between
steps the module is hook-free and ``InversionAudit`` / ``LeakageMonitor`` can run ``torch.func``
on it. They attack what DP-SGD reveals about one example (:attr:`DPSGD.transforms`): its gradient
clipped to ``C`` plus ``N(0, (z C)^2)``.

Structure: the work is :class:`~lightning_privacy.engines.DPSGDEngine`'s (validate, resolve,
make private, release; no Lightning); this callback only checks the Trainer, hands the engine the
module, optimizer and train loader, and puts back what it returns. The Lightning internals it
needs (swapping the train loader, wrapping the precision plugin's ``backward``, reading
``use_distributed_sampler``) are in :mod:`lightning_privacy.callbacks._trainer_internals`, each
with the reason no public hook serves.

Logged keys: ``privacy/epsilon``, ``privacy/delta``, ``privacy/noise_multiplier``,
``privacy/sample_rate`` (once per epoch, on every rank alike).

Example:
    >>> import lightning as L
    >>> from lightning_privacy.data import DigitsDataModule
    >>> from lightning_privacy.models import LeNetDLG, LitClassifier
    >>> dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0)
    >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0,
    ...                     callbacks=[dp], logger=False, enable_progress_bar=False,
    ...                     enable_checkpointing=False, enable_model_summary=False)
    >>> trainer.fit(LitClassifier(LeNetDLG(channels=1, image_size=8)),
    ...             DigitsDataModule(image_size=8, batch_size=128))
    >>> dp.accountant.steps, 0 < dp.epsilon < 10
    (2, True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_privacy._validation import check_float
from lightning_privacy.accountants.gaussian import GaussianMechanismAccountant
from lightning_privacy.callbacks import _trainer_internals as internals
from lightning_privacy.callbacks._budget import EpsilonBudget
from lightning_privacy.defenses.base import GradientTransform
from lightning_privacy.engines.dpsgd import (
    ACCOUNTANTS,
    GRAD_SAMPLE_MODES,
    DPSGDEngine,
    steps_per_epoch,
)
from lightning_privacy.engines.opacus_layers import (
    find_unsupported_layers,
    fix_unsupported_layers,
    name_list,
)

__all__ = [
    "ACCOUNTANTS",
    "DPSGD",
    "GRAD_SAMPLE_MODES",
    "find_unsupported_layers",
    "fix_unsupported_layers",
]


class DPSGD(Callback):
    """Train with DP-SGD (per-sample clipping + Gaussian noise, Opacus) and account for ε.

    Args:
        max_grad_norm: ``C``, the L2 norm every per-sample gradient is clipped to.
        noise_multiplier: ``z``; noise std on the clipped sum is ``z * C``. Exactly one of
            ``noise_multiplier`` and ``target_epsilon``.
        target_epsilon: ε to reach after the planned epochs; ``z`` is computed for it.
        target_delta: δ; defaults to ``1 / (10 N)`` with ``N`` the training-set size. Must be
            ``< 1 / N``.
        epochs: Planned epochs for ``target_epsilon`` (defaults to ``Trainer(max_epochs)``).
        accountant: ``"rdp"`` or ``"prv"`` (Opacus's).
        poisson_sampling: Draw batches by Poisson sampling, as the accountant assumes.
        secure_mode: Cryptographically secure noise and sampling (needs ``torchcsprng``).
        grad_sample_mode: ``"hooks"``, ``"functorch"`` or ``"ghost"`` (see module docs).
        max_epsilon: Stop training before an epoch that would take ε above this.
        fix_model: Replace layers Opacus cannot handle (BatchNorm -> GroupNorm, ...) and turn
            ``inplace`` off on modules that modify a hooked layer's output in place
            (``ReLU(inplace=True)``) instead of raising.

    Attributes:
        engine: The :class:`~lightning_privacy.engines.DPSGDEngine` doing the work.
        accountant: The accountant (:mod:`lightning_privacy.accountants`), Opacus inside.
        noise_multiplier: ``z`` in use (set at fit start when ``target_epsilon`` is given).
        sample_rate: ``q`` in use.
        delta: δ in use.
        stopped_reason: Why ``max_epsilon`` stopped training, else ``None``.
        strength: The argument a sweep's ``dpsgd`` entry varies (``noise_multiplier``).
    """

    strength: ClassVar[str] = "noise_multiplier"

    def __init__(
        self,
        *,
        max_grad_norm: float,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        epochs: int | None = None,
        accountant: str = "rdp",
        poisson_sampling: bool = True,
        secure_mode: bool = False,
        grad_sample_mode: str = "hooks",
        max_epsilon: float | None = None,
        fix_model: bool = False,
    ) -> None:
        self.engine = DPSGDEngine(
            max_grad_norm=max_grad_norm,
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            epochs=epochs,
            accountant=accountant,
            poisson_sampling=poisson_sampling,
            secure_mode=secure_mode,
            grad_sample_mode=grad_sample_mode,
            fix_model=fix_model,
        )
        self.max_epsilon = (
            None
            if max_epsilon is None
            else check_float("max_epsilon", max_epsilon, low=0.0, low_open=True)
        )
        self.budget = EpsilonBudget("DPSGD", self.max_epsilon)
        self.noise_multiplier: float | None = self.engine.noise_multiplier
        self.sample_rate: float | None = None
        self.delta: float | None = self.engine.target_delta
        self._saved: Mapping[str, Any] | None = None
        self._undo: list[Callable[[], None]] = []
        self._warned_past_target = False

    # ------------------------------------------------------------------ properties
    @property
    def accountant(self) -> GaussianMechanismAccountant:
        """The accountant the DP optimizer steps."""
        return self.engine.accountant

    @property
    def max_grad_norm(self) -> float:
        """``C``, the per-sample clipping norm."""
        return self.engine.max_grad_norm

    @property
    def epsilon(self) -> float:
        """ε spent so far at :attr:`delta` (``0.0`` before the first step)."""
        return 0.0 if self.delta is None else self.accountant.get_epsilon(self.delta)

    @property
    def stopped_reason(self) -> str | None:
        """Why ``max_epsilon`` stopped training, else ``None``."""
        return None if self.budget.stop is None else self.budget.stop.message

    @property
    def transforms(self) -> tuple[GradientTransform, ...]:
        """The attacker's view of one example's DP-SGD release, as gradient transforms.

        Sharing one example's gradient under DP-SGD reveals it clipped to ``C`` plus
        ``N(0, (z C)^2)`` noise (the division by the batch size scales both alike), so
        ``InversionAudit`` and ``LeakageMonitor`` attack ``[GradientClipping(C),
        GaussianNoise(z C)]``. Before ``on_fit_start`` resolves a ``target_epsilon`` the noise is
        unknown and reported as ``std=0.0``.

        Example:
            >>> DPSGD(max_grad_norm=0.5, noise_multiplier=2.0).transforms[1].std
            1.0
        """
        from lightning_privacy.defenses.transforms import GaussianNoise, GradientClipping

        std = (self.noise_multiplier or 0.0) * self.max_grad_norm
        return (GradientClipping(max_norm=self.max_grad_norm), GaussianNoise(std=std))

    @property
    def layers(self) -> None:
        """DP-SGD clips and noises every trainable parameter (``GradientDefense`` parity)."""
        return None

    @property
    @override
    def state_key(self) -> str:
        """One DPSGD per Trainer, so one key: a resumed run finds its ε whatever else changed."""
        return "DPSGD"

    # ------------------------------------------------------------------ checks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the Trainer and the model before anything is built (and fix it if asked)."""
        if stage != "fit":
            return
        problems = _trainer_problems(trainer, pl_module, self.engine)
        if problems:
            raise ValueError(
                "DPSGD cannot train with this Trainer:\n  - " + "\n  - ".join(problems)
            )
        replaced = self.engine.validate(pl_module)
        if replaced:
            rank_zero_info(
                f"DPSGD(fix_model=True) replaced {len(replaced)} layer(s) Opacus cannot train "
                f"with DP-compatible ones: {name_list(replaced)}."
            )

    # ------------------------------------------------------------------ wiring
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rehearse one step on a copy, then make the module, optimizer and loader private."""
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"Expected exactly one optimizer for DPSGD, but got {len(trainer.optimizers)}."
            )
        source, loader = _train_loader(trainer)
        fixed = self.engine.rehearse(pl_module, _rehearsal_step(trainer, loader))
        if fixed:
            rank_zero_info(
                f"DPSGD(fix_model=True) set inplace=False on {len(fixed)} module(s) that modified "
                f"a hooked layer's output in place: {name_list(fixed)}."
            )
        plan = self.engine.resolve(
            dataset_size=len(loader.dataset),  # type: ignore[arg-type]
            batches_per_epoch=len(loader),
            steps_per_epoch=steps_per_epoch(len(loader), trainer.limit_train_batches),
            planned_epochs=trainer.max_epochs,
            saved=self._saved,
        )
        self.noise_multiplier, self.sample_rate, self.delta = (
            plan.noise_multiplier,
            plan.sample_rate,
            plan.delta,
        )
        module = trainer.strategy.model
        assert module is not None  # the strategy has wrapped the module by on_fit_start
        original = trainer.optimizers[0]
        dp_optimizer, dp_loader = self.engine.make_private(module, original, loader)
        self._undo = [
            lambda: self.engine.release(module),
            _swap_optimizer(trainer, original, dp_optimizer),
            lambda: internals.restore_train_source(trainer, source),
            internals.wrap_backward(trainer, self.engine.backward),
        ]
        internals.replace_train_dataloader(trainer, dp_loader)
        self._announce(isinstance(module, torch.nn.parallel.DistributedDataParallel))
        self._warn_approximations(trainer)
        self.budget.check_first_release(
            epsilon_after=self.engine.epsilon_after(_epoch_steps(trainer, plan.steps_per_epoch)),
            delta=plan.delta,
            fix="Raise max_epsilon or the noise multiplier",
        )

    def _announce(self, distributed: bool) -> None:
        plan = self.engine.plan
        assert plan is not None  # resolved in on_fit_start
        n = plan.dataset_size
        rank_zero_info(
            f"DPSGD: noise_multiplier={plan.noise_multiplier:.4f}, "
            f"sample_rate={plan.sample_rate:.5f} (expected batch {n * plan.sample_rate:.1f} "
            f"of N={n}), max_grad_norm={self.max_grad_norm}, delta={plan.delta:.3g}, "
            f"accountant={self.engine.accountant_name}."
        )
        if distributed:
            rank_zero_info(
                "DPSGD under DDP: Opacus adds the noise on rank 0 only; every other rank "
                "all-reduces its clipped but un-noised gradient sum (central DP of the aggregate). "
                "DDP's own all-reduce of the unclipped gradients is disabled (no-op comm hook)."
            )

    def _warn_approximations(self, trainer: L.Trainer) -> None:
        """Say at fit start when the reported ε is not the guarantee it looks like."""
        if not self.engine.poisson_sampling:
            rank_zero_warn(
                "DPSGD(poisson_sampling=False): the accountant assumes Poisson sampling, but the "
                "batches are the loader's shuffled fixed-size ones, so the ε reported is only an "
                "approximation, not a guarantee. Use poisson_sampling=True for a proven ε."
            )
        target, planned = self.engine.target_epsilon, self.engine.epochs or trainer.max_epochs
        longest = trainer.max_epochs
        if target is not None and planned and (longest is None or longest < 0 or longest > planned):
            rank_zero_warn(
                f"DPSGD: target_epsilon={target} is planned for {planned} epoch(s), but the "
                f"Trainer may train for max_epochs={longest}: ε passes the target after epoch "
                f"{planned}. Set epochs={longest} (more noise) or max_epsilon={target} to stop "
                "there."
            )

    def _warn_past_target(self, trainer: L.Trainer) -> None:
        target = self.engine.target_epsilon
        if target is None or self._warned_past_target or self.epsilon <= target * (1 + 1e-6):
            return
        self._warned_past_target = True
        rank_zero_warn(
            f"DPSGD: ε={self.epsilon:.4g} after epoch {trainer.current_epoch} has passed "
            f"target_epsilon={target} (the noise was planned for "
            f"{self.engine.epochs or trainer.max_epochs} epoch(s)); the guarantee of this run is "
            f"the ε logged as privacy/epsilon, not the target."
        )

    # ------------------------------------------------------------------ per step
    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Attach the per-sample-gradient hooks for this step's forward and backward."""
        self.engine.attach_hooks()

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Detach the hooks once ``grad_sample`` is computed.

        Between steps the module carries no Opacus hook, so observers (``InversionAudit``,
        ``LeakageMonitor``) can run ``torch.func`` on it, and validation runs hook-free.
        """
        self.engine.detach_hooks()

    # ------------------------------------------------------------------ per epoch
    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log ε, δ, z and q; stop before an epoch that would exceed ``max_epsilon``."""
        assert self.noise_multiplier is not None and self.sample_rate is not None
        metrics = {
            "privacy/epsilon": self.epsilon,
            "privacy/delta": float(self.delta or 0.0),
            "privacy/noise_multiplier": self.noise_multiplier,
            "privacy/sample_rate": self.sample_rate,
        }
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=False)
        self._warn_past_target(trainer)
        if self.max_epsilon is not None and self.engine.plan is not None:
            steps = _epoch_steps(trainer, self.engine.plan.steps_per_epoch)
            self.budget.stop_before_exceeding(
                trainer,
                epsilon=self.epsilon,
                epsilon_after=self.engine.epsilon_after(steps),
                delta=self.engine.plan.delta,
            )

    # ------------------------------------------------------------------ cleanup
    def _release(self) -> None:
        undo, self._undo = self._undo, []
        for step in reversed(undo):
            step()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Remove Opacus's hooks and attributes; restore the optimizer and the data source."""
        if stage == "fit":
            self._release()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Clean up as in ``teardown`` (Lightning skips teardown hooks on exceptions)."""
        self._release()

    # ------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        """Accountant history, noise multiplier, sample rate and δ."""
        return {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "max_grad_norm": self.max_grad_norm,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the accountant so ε continues where the checkpoint left off."""
        if float(state_dict["max_grad_norm"]) != self.max_grad_norm:
            raise ValueError(
                f"Expected the checkpoint's max_grad_norm {state_dict['max_grad_norm']} to equal "
                f"this DPSGD's {self.max_grad_norm}: the restored ε would describe another run."
            )
        self.accountant.load_state_dict(state_dict["accountant"])
        self._saved = dict(state_dict)


def _epoch_steps(trainer: L.Trainer, planned: int) -> int:
    """Optimizer steps of the coming epoch (the Trainer's count once it knows it)."""
    steps = trainer.num_training_batches
    return steps if isinstance(steps, int) and steps > 0 else planned


def _train_loader(trainer: L.Trainer) -> tuple[Any, DataLoader[Any]]:
    """The fit loop's data source and its single map-style ``DataLoader``."""
    source = internals.train_source(trainer)
    if source is None or not source.is_defined():
        raise ValueError("Expected a train dataloader for DPSGD, but the Trainer has none.")
    loader = source.dataloader()
    if not isinstance(loader, DataLoader):
        raise TypeError(
            "Expected the train dataloader to be a single torch DataLoader for DPSGD, but got "
            f"{type(loader).__name__}."
        )
    if isinstance(loader.dataset, IterableDataset) or not hasattr(loader.dataset, "__len__"):
        raise TypeError(
            "Expected a map-style data set with a length for DPSGD (Poisson sampling and the "
            f"accountant need N), but got {type(loader.dataset).__name__}."
        )
    return source, loader


def _rehearsal_step(trainer: L.Trainer, loader: DataLoader[Any]) -> Callable[[nn.Module], Any]:
    """One ``training_step`` of a copy of the module on the first two training examples.

    The examples come from the data set by index (no sampler, so no generator draws). The copy
    reads the Trainer (``self.trainer.global_step`` works) but its ``self.log`` calls are dropped.
    """

    def step(copy: nn.Module) -> Any:
        assert isinstance(copy, L.LightningModule)  # a deep copy of the LightningModule
        copy.trainer = trainer  # the deep copy drops the reference (LightningModule.__getstate__)
        vars(copy).update(log=_ignore, log_dict=_ignore)
        batch = trainer.strategy.batch_to_device(_first_examples(loader))
        with trainer.precision_plugin.train_step_context():
            out = copy.training_step(batch, 0)
        return out.get("loss") if isinstance(out, Mapping) else out

    return step


def _first_examples(loader: DataLoader[Any], n: int = 2) -> Any:
    """The first ``n`` examples of the loader's data set, collated as the loader does."""
    dataset: Any = loader.dataset
    if loader.batch_sampler is None:  # no automatic batching: the data set yields batches
        return loader.collate_fn(dataset[0])
    return loader.collate_fn([dataset[i] for i in range(min(n, len(dataset)))])


def _ignore(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``self.log`` on the rehearsal's copy of the module."""


def _swap_optimizer(
    trainer: L.Trainer, original: torch.optim.Optimizer, private: torch.optim.Optimizer
) -> Callable[[], None]:
    """Give the Trainer the DP optimizer (LR schedulers keep working: they share param groups)."""
    trainer.strategy.optimizers = [private]

    def restore() -> None:
        if trainer.strategy.optimizers and trainer.strategy.optimizers[0] is private:
            trainer.strategy.optimizers = [original]

    return restore


def _trainer_problems(
    trainer: L.Trainer, pl_module: L.LightningModule, engine: DPSGDEngine
) -> list[str]:
    """Every setting of the Trainer (and module) DP-SGD cannot train with, one line each."""
    return [
        *_strategy_problems(trainer, engine),
        *_step_problems(trainer, engine),
        *_composition_problems(trainer, pl_module),
    ]


def _strategy_problems(trainer: L.Trainer, engine: DPSGDEngine) -> list[str]:
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return [
            f"strategy {type(strategy).__name__} is not supported; use a single device or "
            "DDP (strategy='ddp' / 'ddp_spawn')"
        ]
    if not (isinstance(strategy, DDPStrategy) and trainer.world_size > 1):
        return []
    problems = []
    if internals.uses_distributed_sampler(trainer):
        problems.append(
            "under DDP set Trainer(use_distributed_sampler=False): the callback builds a "
            "distributed Poisson loader itself (a DistributedSampler would break accounting)"
        )
    if not engine.poisson_sampling:
        problems.append(
            "under DDP DPSGD needs poisson_sampling=True (the distributed Poisson loader keeps "
            "the global batch and ε equal to one process)"
        )
    if engine.grad_sample_mode == "ghost":
        problems.append(
            "grad_sample_mode='ghost' is single-device for now (two backward passes per "
            "forward conflict with DDP's reducer); use 'hooks' under DDP"
        )
    return problems


def _step_problems(trainer: L.Trainer, engine: DPSGDEngine) -> list[str]:
    problems = []
    if trainer.accumulate_grad_batches != 1:
        why = (
            "Opacus forbids accumulating per-sample gradients with Poisson sampling"
            if engine.poisson_sampling
            else "Lightning divides the loss by the accumulation factor, which would change "
            "the clipping of every per-sample gradient"
        )
        problems.append(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches}: {why}; use a larger "
            "batch size (the DP loader's expected batch is what counts) instead"
        )
    if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
        problems.append(
            f"gradient_clip_val={trainer.gradient_clip_val}: the DP optimizer overwrites the "
            "gradient after Lightning clips it; per-sample clipping is `max_grad_norm`"
        )
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None or str(trainer.precision) == "16-true":
        problems.append(
            f"precision={trainer.precision!r}: fp16 is not supported (with a GradScaler "
            "Opacus's per-sample gradients stay scaled and would be clipped at scale * C; "
            "pure fp16 underflows); use precision='bf16-mixed' or '32-true'"
        )
    return problems


def _composition_problems(trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
    from lightning_privacy.callbacks.gradient_defense import GradientDefense

    problems = []
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    if any(isinstance(cb, GradientDefense) for cb in callbacks):
        problems.append(
            "a GradientDefense is in the Trainer too: the DP optimizer replaces the gradient "
            "it defends (and its comm hook), so the two do not compose; use one of them"
        )
    if not pl_module.automatic_optimization:
        problems.append("manual optimization is not supported; use automatic optimization")
    return problems
