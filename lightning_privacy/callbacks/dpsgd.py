"""DP-SGD for any LightningModule, from one callback (Opacus under the hood).

``Trainer(callbacks=[DPSGD(max_grad_norm=1.0, target_epsilon=3.0)])`` trains the user's module
with Opacus's DP-SGD without changing the module:

* ``setup``: checks the Trainer (strategy, precision, accumulation, clipping, samplers) and the
  model: every layer Opacus cannot handle is collected with ``ModuleValidator`` -- plus trainable
  subclasses of BatchNorm (e.g. timm's ``BatchNormAct2d``), which Opacus's exact-type check
  misses -- and reported in one error naming the fix. ``fix_model=True`` replaces the fixable ones
  (BatchNorm -> GroupNorm, ...) in place, before the optimizer is built.
* ``on_fit_start``: ``PrivacyEngine.make_private(module=trainer.strategy.model, wrap_model=False)``
  attaches the per-sample-gradient hooks; the resulting ``DPOptimizer`` replaces the Trainer's
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
the usual approximation (Opacus says so), not a proof.

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

Observers
---------
Opacus's hooks are attached only from ``on_train_batch_start`` to ``on_after_backward``, so between
steps the module is hook-free and ``InversionAudit`` / ``LeakageMonitor`` can run ``torch.func``
on it. They attack what DP-SGD reveals about one example (:attr:`DPSGD.transforms`): its gradient
clipped to ``C`` plus ``N(0, (z C)^2)``.

Lightning internals used (no public API exists for them): the train loader is swapped through
``trainer.fit_loop._data_source``; ghost mode and per-sample losses wrap the precision plugin's
``backward`` (an instance attribute, removed in ``teardown``); the DDP check reads
``trainer._accelerator_connector.use_distributed_sampler``.

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

import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_privacy._validation import check_choice, check_float, check_int
from lightning_privacy.accountants.gaussian import GaussianMechanismAccountant
from lightning_privacy.accountants.registry import create_accountant
from lightning_privacy.defenses.base import GradientTransform
from lightning_privacy.functional.accounting import check_delta, dpsgd_noise_multiplier

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
ACCOUNTANTS = ("rdp", "prv")
_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad", "_forward_counter")
_PARAM_ATTRS = (
    "grad_sample",
    "_forward_counter",
    "_current_grad_sample",
    "_norm_sample",
    "summed_grad",
    "_processed",
)


def find_unsupported_layers(module: nn.Module) -> list[str]:
    """Every layer of ``module`` Opacus cannot train with DP-SGD, one line each with its fix.

    Runs Opacus's ``ModuleValidator`` per trainable submodule and also flags trainable
    subclasses of ``_BatchNorm`` and trainable layers with buffers, which Opacus's exact-type
    validators miss (timm's ``BatchNormAct2d`` is one).

    Example:
        >>> class MyBN(nn.BatchNorm2d):
        ...     pass
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), MyBN(4))
        >>> for line in find_unsupported_layers(net):
        ...     print(line.split(":")[0])
        '1' (BatchNorm2d)
        '2' (MyBN)
    """
    from opacus.validators.module_validator import ModuleValidator

    problems = []
    for name, sub in module.named_modules():
        own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        label = f"{name!r} ({type(sub).__name__})"
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        if validator is not None:
            errors = validator(sub)
            if errors:
                fix = ModuleValidator.FIXERS.get(type(sub))
                how = " [fixable: fix_model=True]" if fix is not None else ""
                problems.append(f"{label}: {'; '.join(str(e) for e in errors)}{how}")
            continue
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            problems.append(
                f"{label}: a subclass of BatchNorm (BatchNorm mixes examples,"
                " so per-sample gradients do not exist); Opacus's exact-type check misses "
                "it and fix_model cannot rebuild it -- build the model with GroupNorm/LayerNorm "
                "(timm: norm_layer=...), or freeze it (requires_grad_(False) and eval())"
            )
        elif list(sub.buffers(recurse=False)):
            problems.append(
                f"{label}: a trainable layer with buffers, which Opacus cannot compute per-sample "
                "gradients for -- replace it or freeze its parameters"
            )
    return problems


def fix_unsupported_layers(module: nn.Module) -> list[str]:
    """Replace, in place, every layer Opacus's ``ModuleValidator`` knows how to fix.

    BatchNorm becomes ``GroupNorm(gcd(32, C), C)``, LSTM/GRU/MultiheadAttention their DP
    versions, InstanceNorm stops tracking running stats. Returns the replaced names.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> fix_unsupported_layers(net), type(net[1]).__name__
        (['1'], 'GroupNorm')
    """
    from opacus.validators.module_validator import ModuleValidator

    replaced = []
    for name, sub in list(module.named_modules()):
        fixer = ModuleValidator.FIXERS.get(type(sub))
        if not name or fixer is None or not any(p.requires_grad for p in sub.parameters(False)):
            continue
        if not ModuleValidator.VALIDATORS.get(type(sub), lambda m: [])(sub):
            continue
        new = fixer(sub)
        first = next(sub.parameters(), None)
        if first is not None:
            new = new.to(first.device)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        parent._modules[child] = new
        replaced.append(name)
    return replaced


def _steps_per_epoch(trainer: L.Trainer, batches: int) -> int:
    """Optimizer steps per epoch once ``limit_train_batches`` is applied (as Lightning does)."""
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        return max(1, min(batches, limit))
    if limit is None:
        return batches
    return max(1, int(batches * float(limit)))


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
        fix_model: Replace layers Opacus cannot handle (BatchNorm -> GroupNorm, ...) instead of
            raising.

    Attributes:
        accountant: The accountant (:mod:`lightning_privacy.accountants`), Opacus inside.
        noise_multiplier: ``z`` in use (set at fit start when ``target_epsilon`` is given).
        sample_rate: ``q`` in use.
        delta: δ in use.
        stopped_reason: Why ``max_epsilon`` stopped training, else ``None``.
    """

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
        self.max_grad_norm = check_float("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError(
                "Expected exactly one of `noise_multiplier` and `target_epsilon`, but got "
                f"noise_multiplier={noise_multiplier!r} and target_epsilon={target_epsilon!r}."
            )
        self._given_noise_multiplier = (
            None
            if noise_multiplier is None
            else check_float("noise_multiplier", noise_multiplier, low=0.0)
        )
        self.target_epsilon = (
            None
            if target_epsilon is None
            else check_float("target_epsilon", target_epsilon, low=0.0, low_open=True)
        )
        self._given_delta = (
            None if target_delta is None else check_delta(target_delta, "target_delta")
        )
        self.epochs = None if epochs is None else check_int("epochs", epochs, low=1)
        self.accountant_name = check_choice("accountant", accountant, ACCOUNTANTS)
        self.poisson_sampling = bool(poisson_sampling)
        self.secure_mode = bool(secure_mode)
        if self.secure_mode:
            try:
                import torchcsprng  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "DPSGD(secure_mode=True) needs the `torchcsprng` package for secure noise "
                    "and sampling; install it or use secure_mode=False for experiments."
                ) from err
        self.grad_sample_mode = check_choice(
            "grad_sample_mode", grad_sample_mode, GRAD_SAMPLE_MODES
        )
        self.max_epsilon = (
            None
            if max_epsilon is None
            else check_float("max_epsilon", max_epsilon, low=0.0, low_open=True)
        )
        self.fix_model = bool(fix_model)

        self.accountant: GaussianMechanismAccountant = create_accountant(self.accountant_name)
        self.noise_multiplier: float | None = self._given_noise_multiplier
        self.sample_rate: float | None = None
        self.delta: float | None = self._given_delta
        self.stopped_reason: str | None = None
        self._saved: dict[str, Any] | None = None
        self._hooks: Any = None
        self._original_optimizer: torch.optim.Optimizer | None = None
        self._original_source: Any = None
        self._patched_plugin: Any = None
        self._dp_optimizer: Any = None
        self._steps_per_epoch = 1

    # ------------------------------------------------------------------ properties
    @property
    def epsilon(self) -> float:
        """ε spent so far at :attr:`delta` (``0.0`` before the first step)."""
        if self.delta is None:
            return 0.0
        return self.accountant.get_epsilon(self.delta)

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
    def state_key(self) -> str:
        """One DPSGD per Trainer: its state is stored under the class name."""
        return "DPSGD"

    # ------------------------------------------------------------------ checks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the Trainer and the model before anything is built (and fix it if asked)."""
        if stage != "fit":
            return
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        strategy = trainer.strategy
        problems = []
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            problems.append(
                f"strategy {type(strategy).__name__} is not supported; use a single device or "
                "DDP (strategy='ddp' / 'ddp_spawn')"
            )
        distributed = isinstance(strategy, DDPStrategy) and trainer.world_size > 1
        if distributed and trainer._accelerator_connector.use_distributed_sampler:
            problems.append(
                "under DDP set Trainer(use_distributed_sampler=False): the callback builds a "
                "distributed Poisson loader itself (a DistributedSampler would break accounting)"
            )
        if distributed and not self.poisson_sampling:
            problems.append(
                "under DDP DPSGD needs poisson_sampling=True (the distributed Poisson loader keeps "
                "the global batch and ε equal to one process)"
            )
        if distributed and self.grad_sample_mode == "ghost":
            problems.append(
                "grad_sample_mode='ghost' is single-device for now (two backward passes per "
                "forward conflict with DDP's reducer); use 'hooks' under DDP"
            )
        if trainer.accumulate_grad_batches != 1:
            why = (
                "Opacus forbids accumulating per-sample gradients with Poisson sampling"
                if self.poisson_sampling
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
        plugin = trainer.precision_plugin
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None or str(trainer.precision) == "16-true":
            problems.append(
                f"precision={trainer.precision!r}: fp16 is not supported (with a GradScaler "
                "Opacus's per-sample gradients stay scaled and would be clipped at scale * C; "
                "pure fp16 underflows); use precision='bf16-mixed' or '32-true'"
            )
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        if any(type(cb).__name__ == "GradientDefense" for cb in callbacks):
            problems.append(
                "a GradientDefense is in the Trainer too: the DP optimizer replaces the gradient "
                "it defends (and its comm hook), so the two do not compose; use one of them"
            )
        if not pl_module.automatic_optimization:
            problems.append("manual optimization is not supported; use automatic optimization")
        if problems:
            raise ValueError(
                "DPSGD cannot train with this Trainer:\n  - " + "\n  - ".join(problems)
            )
        self._check_model(pl_module)

    def _check_model(self, pl_module: L.LightningModule) -> None:
        if self.fix_model:
            replaced = fix_unsupported_layers(pl_module)
            if replaced:
                rank_zero_info(
                    f"DPSGD(fix_model=True) replaced {len(replaced)} layer(s) Opacus cannot train "
                    f"with DP-compatible ones: {', '.join(replaced)}."
                )
        problems = find_unsupported_layers(pl_module)
        if problems:
            fix = (
                "The remaining ones cannot be fixed automatically."
                if self.fix_model
                else "Fix: DPSGD(..., fix_model=True) replaces the fixable ones (BatchNorm -> "
                "GroupNorm), or build the model with GroupNorm / opacus.validators."
                "ModuleValidator.fix(model)."
            )
            raise ValueError(
                f"DPSGD: Opacus cannot compute per-sample gradients for {len(problems)} layer(s) "
                "of this model:\n  - " + "\n  - ".join(problems) + f"\n{fix}"
            )

    # ------------------------------------------------------------------ wiring
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Make the module, optimizer and train loader private (Opacus ``make_private``)."""
        from opacus import PrivacyEngine

        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"Expected exactly one optimizer for DPSGD, but got {len(trainer.optimizers)}."
            )
        loader = self._train_loader(trainer)
        n = len(loader.dataset)  # type: ignore[arg-type]
        self.sample_rate = 1.0 / len(loader)
        self._steps_per_epoch = _steps_per_epoch(trainer, len(loader))
        self._resolve_delta(n)
        self._resolve_noise_multiplier(trainer, len(loader))
        assert self.noise_multiplier is not None and self.delta is not None

        module = trainer.strategy.model
        assert module is not None
        distributed = isinstance(module, torch.nn.parallel.DistributedDataParallel)
        modes = {name: sub.training for name, sub in module.named_modules()}
        module.train()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            engine = PrivacyEngine(accountant=self.accountant_name, secure_mode=self.secure_mode)
        engine.accountant = self.accountant.opacus_accountant
        self._original_optimizer = trainer.optimizers[0]
        try:
            out = engine.make_private(
                module=module,
                optimizer=self._original_optimizer,
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                poisson_sampling=self.poisson_sampling,
                grad_sample_mode=self.grad_sample_mode,
                wrap_model=False,
            )
        finally:
            for name, sub in module.named_modules():
                sub.training = modes[name]
        self._hooks, dp_optimizer, dp_loader = out[0], out[1], out[-1]
        self._dp_optimizer = dp_optimizer
        trainer.strategy.optimizers = [dp_optimizer]
        self._replace_train_loader(trainer, dp_loader)
        if distributed:
            self._silence_ddp_allreduce(module)
        self._patch_backward(trainer)
        rank_zero_info(
            f"DPSGD: noise_multiplier={self.noise_multiplier:.4f}, "
            f"sample_rate={self.sample_rate:.5f} (expected batch {n * self.sample_rate:.1f} "
            f"of N={n}), max_grad_norm={self.max_grad_norm}, delta={self.delta:.3g}, "
            f"accountant={self.accountant_name}."
        )
        if distributed:
            rank_zero_info(
                "DPSGD under DDP: Opacus adds the noise on rank 0 only; every other rank "
                "all-reduces its clipped but un-noised gradient sum (central DP of the aggregate). "
                "DDP's own all-reduce of the unclipped gradients is disabled (no-op comm hook)."
            )
        if self.max_epsilon is not None and self._epsilon_after_one_more_epoch(trainer) > (
            self.max_epsilon
        ):
            raise ValueError(
                f"Expected `max_epsilon` to allow at least one epoch, but one epoch already spends "
                f"ε={self._epsilon_after_one_more_epoch(trainer):.3f} > {self.max_epsilon}. "
                "Raise max_epsilon or the noise multiplier."
            )

    def _train_loader(self, trainer: L.Trainer) -> DataLoader[Any]:
        source = getattr(trainer.fit_loop, "_data_source", None)
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
        self._original_source = source
        return loader

    def _resolve_delta(self, n: int) -> None:
        saved = (self._saved or {}).get("delta")
        if self._given_delta is None:
            self.delta = saved if saved is not None else 1.0 / (10.0 * n)
        elif self._given_delta >= 1.0 / n:
            raise ValueError(
                f"Expected `target_delta` to be < 1/N = {1.0 / n:.3g} (N={n} training examples; a "
                f"larger δ allows publishing an example outright), but got {self._given_delta!r}."
            )

    def _resolve_noise_multiplier(self, trainer: L.Trainer, batches_per_epoch: int) -> None:
        saved = (self._saved or {}).get("noise_multiplier")
        if self._given_noise_multiplier is not None:
            self.noise_multiplier = self._given_noise_multiplier
            return
        if saved is not None:
            self.noise_multiplier = float(saved)
            return
        epochs = self.epochs
        if epochs is None:
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise ValueError(
                    "Expected `epochs` (the planned number of epochs) with `target_epsilon` when "
                    f"the Trainer has no max_epochs, but got epochs=None, max_epochs="
                    f"{trainer.max_epochs!r}."
                )
            epochs = trainer.max_epochs
        assert self.target_epsilon is not None and self.delta is not None
        self.noise_multiplier = dpsgd_noise_multiplier(
            target_epsilon=self.target_epsilon,
            target_delta=self.delta,
            sample_rate=1.0 / batches_per_epoch,
            steps=epochs * self._steps_per_epoch,
            accountant=self.accountant_name,
        )

    def _replace_train_loader(self, trainer: L.Trainer, dp_loader: DataLoader[Any]) -> None:
        from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource

        trainer.fit_loop._data_source = _DataLoaderSource(dp_loader, "train_dataloader")
        trainer.fit_loop._combined_loader = None  # rebuilt from the DP loader

    def _silence_ddp_allreduce(self, ddp: nn.Module) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

        try:
            ddp.register_comm_hook(None, noop_hook)  # type: ignore[operator]
        except RuntimeError as err:
            raise RuntimeError(
                "DPSGD registers a no-op DDP communication hook (Opacus all-reduces the clipped "
                "sums itself), but the DDP model already has one; remove the other hook "
                "(GradientDefense placement='local' does not compose with DP-SGD)."
            ) from err

    def _patch_backward(self, trainer: L.Trainer) -> None:
        plugin = trainer.precision_plugin
        original = plugin.backward
        hooks, optimizer, ghost = self._hooks, self._dp_optimizer, self.grad_sample_mode == "ghost"

        def backward(tensor: Tensor, model: Any, opt: Any, *args: Any, **kwargs: Any) -> None:
            if tensor.ndim == 0:
                if ghost:
                    raise ValueError(
                        "DPSGD(grad_sample_mode='ghost') needs per-sample losses: return "
                        "F.cross_entropy(logits, y, reduction='none') (shape [batch]) from "
                        "training_step instead of the mean."
                    )
                return original(tensor, model, opt, *args, **kwargs)
            if tensor.ndim != 1:
                raise ValueError(
                    "Expected training_step to return a scalar loss or per-sample losses of shape "
                    f"[batch], but got shape {tuple(tensor.shape)}."
                )
            if not ghost:
                return original(tensor.mean(), model, opt, *args, **kwargs)
            from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

            DPTensorFastGradientClipping(hooks, optimizer, tensor, "mean").backward()
            return None

        plugin.backward = backward  # type: ignore[method-assign,assignment]
        self._patched_plugin = plugin

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Attach the per-sample-gradient hooks for this step's forward and backward."""
        hooks = self._hooks
        if hooks is not None and not hasattr(hooks, "autograd_grad_sample_hooks"):
            hooks.add_hooks(
                loss_reduction=hooks.loss_reduction,
                batch_first=hooks.batch_first,
                force_functorch=hooks.force_functorch,
            )

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Detach the hooks once ``grad_sample`` is computed.

        Between steps the module carries no Opacus hook, so observers (``InversionAudit``,
        ``LeakageMonitor``) can run ``torch.func`` on it, and validation runs hook-free.
        """
        if self._hooks is not None:
            self._hooks.remove_hooks()

    # ------------------------------------------------------------------ per epoch
    def _epsilon_after_one_more_epoch(self, trainer: L.Trainer) -> float:
        probe = create_accountant(self.accountant_name)
        probe.load_state_dict(self.accountant.state_dict())
        assert self.noise_multiplier is not None and self.sample_rate is not None
        steps = trainer.num_training_batches
        if not isinstance(steps, int) or steps <= 0:
            steps = self._steps_per_epoch
        probe.step(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=steps
        )
        assert self.delta is not None
        return probe.get_epsilon(self.delta)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log ε, δ, z and q; stop before an epoch that would exceed ``max_epsilon``."""
        eps = self.epsilon
        assert self.noise_multiplier is not None and self.sample_rate is not None
        metrics = {
            "privacy/epsilon": eps,
            "privacy/delta": float(self.delta or 0.0),
            "privacy/noise_multiplier": self.noise_multiplier,
            "privacy/sample_rate": self.sample_rate,
        }
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=False)
        if self.max_epsilon is None:
            return
        nxt = self._epsilon_after_one_more_epoch(trainer)
        stop = nxt > self.max_epsilon
        stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and not trainer.should_stop:
            self.stopped_reason = (
                f"DPSGD: stopping after epoch {trainer.current_epoch}: ε={eps:.3f} so far and "
                f"one more epoch would reach ε={nxt:.3f} > max_epsilon={self.max_epsilon} "
                f"(δ={self.delta:.3g})."
            )
            rank_zero_info(self.stopped_reason)
        trainer.should_stop = trainer.should_stop or stop

    # ------------------------------------------------------------------ cleanup
    def _cleanup(self, trainer: L.Trainer) -> None:
        if self._hooks is not None:
            self._hooks.cleanup()
            module = trainer.strategy.model or trainer.lightning_module
            for sub in module.modules():
                for attr in _MODULE_ATTRS:
                    if attr in sub.__dict__:
                        delattr(sub, attr)
                for p in sub.parameters(recurse=False):
                    for attr in _PARAM_ATTRS:
                        if hasattr(p, attr):
                            delattr(p, attr)
            self._hooks = None
        if self._patched_plugin is not None:
            if "backward" in self._patched_plugin.__dict__:
                del self._patched_plugin.backward
            self._patched_plugin = None
        if self._original_optimizer is not None:
            if trainer.strategy.optimizers and trainer.strategy.optimizers[0] is self._dp_optimizer:
                trainer.strategy.optimizers = [self._original_optimizer]
            self._original_optimizer = None
            self._dp_optimizer = None
        if self._original_source is not None:
            trainer.fit_loop._data_source = self._original_source
            self._original_source = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Remove Opacus's hooks and attributes; restore the optimizer and the data source."""
        if stage == "fit":
            self._cleanup(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Clean up as in ``teardown`` (Lightning skips teardown hooks on exceptions)."""
        self._cleanup(trainer)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Accountant history, noise multiplier, sample rate and δ."""
        return {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "max_grad_norm": self.max_grad_norm,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the accountant so ε continues where the checkpoint left off."""
        if float(state_dict["max_grad_norm"]) != self.max_grad_norm:
            raise ValueError(
                f"Expected the checkpoint's max_grad_norm {state_dict['max_grad_norm']} to equal "
                f"this DPSGD's {self.max_grad_norm}: the restored ε would describe another run."
            )
        self.accountant.load_state_dict(state_dict["accountant"])
        self._saved = dict(state_dict)
