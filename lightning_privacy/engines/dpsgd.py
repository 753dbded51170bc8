"""DP-SGD as a component: Opacus's ``PrivacyEngine`` in five named phases, with no Lightning.

The phases follow Opacus's own ``PrivacyEngine._prepare_*`` split, so each can be read, tested
and called on its own:

1. **validate** (:meth:`DPSGDEngine.validate`): every layer Opacus cannot give per-sample
   gradients for, collected in one error grouped by layer type and problem (after replacing the
   fixable ones with ``fix_model=True``);
2. **rehearse** (:meth:`DPSGDEngine.rehearse`): one training step on a deep copy of the module
   under Opacus's hooks, which finds every module that modifies a hooked layer's output in place
   (PyTorch forbids it under Opacus's backward hooks, see :mod:`~lightning_privacy.engines.inplace`)
   and reports them in one error; ``fix_model=True`` turns ``inplace`` off where a module's own
   flag is the cause. The module, its statistics, gradients and the global RNG stay untouched;
3. **resolve** (:meth:`DPSGDEngine.resolve`): δ (default ``1 / (10 N)``), the sample rate
   ``q = 1 / batches``, and the noise multiplier ``z`` (given, restored from a checkpoint, or
   computed for ``target_epsilon``) -- a :class:`DPSGDPlan`;
4. **make private** (:meth:`DPSGDEngine.make_private`): ``PrivacyEngine.make_private(...,
   wrap_model=False)`` attaches the per-sample-gradient hooks to the module itself and returns
   the ``DPOptimizer`` and the Poisson data loader; under DDP the module's own all-reduce is
   replaced by a no-op communication hook (Opacus all-reduces the clipped sums itself). Between
   steps the hooks are off (:meth:`~DPSGDEngine.attach_hooks`, :meth:`~DPSGDEngine.detach_hooks`),
   and :meth:`~DPSGDEngine.backward` runs per-sample losses (ghost clipping) through Opacus;
5. **release** (:meth:`DPSGDEngine.release`): removes the hooks and every attribute that
   appeared on the hooked layers and their parameters while Opacus was attached (a snapshot taken
   in phase 4, so no list of Opacus's attribute names has to be kept in step with Opacus).

The accountant (:attr:`DPSGDEngine.accountant`) is the one the ``DPOptimizer`` steps; ε and the
look-ahead for a budget come from it.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> engine = DPSGDEngine(max_grad_norm=1.0, noise_multiplier=1.0)
    >>> net = torch.nn.Linear(3, 2)
    >>> engine.validate(net)
    []
    >>> engine.rehearse(net, lambda copy: copy(torch.rand(2, 3)).sum())
    []
    >>> loader = DataLoader(TensorDataset(torch.rand(40, 3), torch.zeros(40).long()), batch_size=8)
    >>> plan = engine.resolve(dataset_size=40, batches_per_epoch=5, steps_per_epoch=5)
    >>> plan.sample_rate, plan.delta
    (0.2, 0.0025)
    >>> sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> optimizer, dp_loader = engine.make_private(net, sgd, loader)
    >>> engine.release(net)
    >>> [k for k in vars(net.weight) if "grad_sample" in k]
    []
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_privacy._validation import check_bool, check_choice, check_float, check_int
from lightning_privacy.accountants.gaussian import GaussianMechanismAccountant
from lightning_privacy.accountants.registry import create_accountant
from lightning_privacy.engines.inplace import (
    InplaceWrite,
    find_inplace_writes,
    inplace_report,
    turn_off_inplace,
)
from lightning_privacy.engines.opacus_layers import (
    fix_unsupported_layers,
    group_layer_problems,
    layer_problems,
)
from lightning_privacy.functional.accounting import (
    check_delta,
    check_delta_for_dataset,
    dpsgd_noise_multiplier,
)

__all__ = ["ACCOUNTANTS", "GRAD_SAMPLE_MODES", "DPSGDEngine", "DPSGDPlan", "steps_per_epoch"]

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
ACCOUNTANTS = ("rdp", "prv")
_GHOST_NEEDS_PER_SAMPLE = (
    "DPSGD(grad_sample_mode='ghost') needs per-sample losses: return "
    "F.cross_entropy(logits, y, reduction='none') (shape [batch]) from training_step instead of "
    "the mean, or use grad_sample_mode='hooks'."
)


@dataclass(frozen=True)
class DPSGDPlan:
    """What :meth:`DPSGDEngine.resolve` fixed for a run.

    Attributes:
        dataset_size: ``N``, the number of training examples.
        sample_rate: ``q``, each example's Poisson inclusion probability per step.
        steps_per_epoch: Optimizer steps per epoch (after ``limit_train_batches``).
        delta: δ of the reported ε.
        noise_multiplier: ``z``; the noise std on the clipped sum is ``z * max_grad_norm``.

    Example:
        >>> DPSGDPlan(100, 0.1, 10, 1e-3, 1.0).noise_multiplier
        1.0
    """

    dataset_size: int
    sample_rate: float
    steps_per_epoch: int
    delta: float
    noise_multiplier: float


def steps_per_epoch(batches: int, limit: int | float | None) -> int:
    """Optimizer steps per epoch once a ``limit_train_batches`` is applied (as Lightning does).

    Example:
        >>> steps_per_epoch(23, 5), steps_per_epoch(23, 0.5), steps_per_epoch(23, None)
        (5, 11, 23)
    """
    if isinstance(limit, int):
        return max(1, min(batches, limit))
    if limit is None:
        return batches
    return max(1, int(batches * float(limit)))


class DPSGDEngine:
    """Opacus's DP-SGD for one module, optimizer and data loader, in named phases.

    Args:
        max_grad_norm: ``C``, the L2 norm every per-sample gradient is clipped to.
        noise_multiplier: ``z``; exactly one of ``noise_multiplier`` and ``target_epsilon``.
        target_epsilon: ε to reach after ``epochs``; ``z`` is computed for it in :meth:`resolve`.
        target_delta: δ; defaults to ``1 / (10 N)``. Must be ``< 1 / N``.
        epochs: Planned epochs for ``target_epsilon`` (else the ``planned_epochs`` of
            :meth:`resolve`).
        accountant: ``"rdp"`` or ``"prv"`` (Opacus's).
        poisson_sampling: Draw batches by Poisson sampling, as the accountant assumes.
        secure_mode: Cryptographically secure noise and sampling (needs ``torchcsprng``).
        grad_sample_mode: ``"hooks"``, ``"functorch"`` or ``"ghost"`` (per-sample losses).
        fix_model: Replace the layers Opacus can fix (BatchNorm -> GroupNorm, ...) in
            :meth:`validate`, and turn ``inplace`` off on the modules :meth:`rehearse` finds
            modifying a hooked output in place, instead of reporting them.

    Attributes:
        accountant: The accountant the DP optimizer steps (Opacus's, wrapped).
        plan: The :class:`DPSGDPlan` once :meth:`resolve` ran, else ``None``.

    Example:
        >>> DPSGDEngine(max_grad_norm=1.0, noise_multiplier=1.0).accountant
        RDPAccountant(steps=0)
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
        fix_model: bool = False,
    ) -> None:
        self.max_grad_norm = check_float("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
        self.noise_multiplier, self.target_epsilon = _check_noise(noise_multiplier, target_epsilon)
        self.target_delta = (
            None if target_delta is None else check_delta(target_delta, "target_delta")
        )
        self.epochs = None if epochs is None else check_int("epochs", epochs, low=1)
        self.accountant_name = check_choice("accountant", accountant, ACCOUNTANTS)
        self.poisson_sampling = check_bool("poisson_sampling", poisson_sampling)
        self.secure_mode = _check_secure_mode(secure_mode)
        self.grad_sample_mode = check_choice(
            "grad_sample_mode", grad_sample_mode, GRAD_SAMPLE_MODES
        )
        self.fix_model = check_bool("fix_model", fix_model)
        accountant_obj = create_accountant(self.accountant_name)
        assert isinstance(accountant_obj, GaussianMechanismAccountant)  # ACCOUNTANTS are Opacus's
        self.accountant: GaussianMechanismAccountant = accountant_obj
        self.plan: DPSGDPlan | None = None
        self._hooks: Any = None
        self._optimizer: Any = None
        self._attached: dict[int, set[str]] = {}

    # ------------------------------------------------------------------ 1. validate
    def validate(self, module: nn.Module) -> list[str]:
        """Fix what ``fix_model`` allows, then raise once for every layer still unsupported.

        Returns:
            The names of the layers replaced by ``fix_model=True``.

        Raises:
            ValueError: Listing every layer Opacus cannot train, one line per layer type and
                problem (count, first names, the problem once, whether ``fix_model`` fixes it).

        Example:
            >>> net = torch.nn.Sequential(*[torch.nn.BatchNorm1d(2) for _ in range(5)])
            >>> DPSGDEngine(max_grad_norm=1.0, noise_multiplier=1.0).validate(net)
            Traceback (most recent call last):
            ...
            ValueError: DPSGD: Opacus cannot compute per-sample gradients for 5 layer(s) ...
            >>> DPSGDEngine(max_grad_norm=1.0, noise_multiplier=1.0, fix_model=True).validate(net)
            ['0', '1', '2', '3', '4']
        """
        replaced = fix_unsupported_layers(module) if self.fix_model else []
        problems = layer_problems(module)
        if problems:
            if self.fix_model:
                fix = "The remaining ones cannot be fixed automatically."
            elif any(p.fixable for p in problems):
                fix = (
                    "Fix: DPSGD(..., fix_model=True) replaces the fixable ones (BatchNorm -> "
                    "GroupNorm), or build the model with GroupNorm / opacus.validators."
                    "ModuleValidator.fix(model)."
                )
            else:
                fix = "fix_model=True cannot fix these; replace or freeze them."
            lines = group_layer_problems(problems)
            raise ValueError(
                f"DPSGD: Opacus cannot compute per-sample gradients for {len(problems)} layer(s) "
                "of this model:\n  - " + "\n  - ".join(lines) + f"\n{fix}"
            )
        return replaced

    # ------------------------------------------------------------------ 2. rehearse
    def rehearse(self, module: nn.Module, step: Callable[[nn.Module], Any]) -> list[str]:
        """Rehearse one training step on a copy of ``module``; refuse the in-place writes found.

        ``step(copy)`` runs the forward pass of one training step on a deep copy of ``module``
        (with Opacus's hooks for this ``grad_sample_mode`` attached) and returns the loss, which
        is back-propagated on the copy. ``module`` itself, its buffers and ``.grad`` and the
        global random streams are left as they were (see
        :func:`~lightning_privacy.engines.inplace.find_inplace_writes`). With ``fix_model=True``
        a module whose own ``inplace=True`` is the cause gets ``inplace = False`` (on ``module``)
        and the step is rehearsed again.

        Returns:
            The names of the modules ``fix_model=True`` set ``inplace=False`` on.

        Raises:
            ValueError: Naming every module that modifies a hooked layer's output in place, the
                op, and what to change (grouped by module type and op); or, with
                ``grad_sample_mode="ghost"``, when the step returns a scalar loss (ghost clipping
                needs the per-sample losses).

        Warns:
            RuntimeWarning: If the rehearsal fails for another reason (the copy cannot be made,
                ``step`` raises): the check is skipped; a real problem then shows in the first
                training step.

        Example:
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(inplace=True))
            >>> engine = DPSGDEngine(max_grad_norm=1.0, noise_multiplier=1.0)
            >>> engine.rehearse(net, lambda copy: copy(torch.rand(2, 3)).sum())
            Traceback (most recent call last):
            ...
            ValueError: DPSGD: 1 module(s) modify in place the output of a layer Opacus hooks ...
            >>> engine.fix_model = True
            >>> engine.rehearse(net, lambda copy: copy(torch.rand(2, 3)).sum()), net[1].inplace
            (['1'], False)
        """
        shapes: list[tuple[int, ...]] = []

        def recorded(copy: nn.Module) -> Any:
            loss = step(copy)
            if isinstance(loss, Tensor):
                shapes.append(tuple(loss.shape))
            return loss

        writes = self._rehearsal(module, recorded)
        if self.grad_sample_mode == "ghost" and () in shapes:
            raise ValueError(_GHOST_NEEDS_PER_SAMPLE)
        fixed: list[str] = []
        if self.fix_model and any(w.fixable for w in writes):
            fixed = turn_off_inplace(module, [w.name for w in writes if w.fixable])
            writes = self._rehearsal(module, recorded)
        if writes:
            raise ValueError(inplace_report(writes, fix_model=self.fix_model, fixed=fixed))
        return fixed

    def _rehearsal(self, module: nn.Module, step: Callable[[nn.Module], Any]) -> list[InplaceWrite]:
        try:
            return find_inplace_writes(
                module,
                step,
                grad_sample_mode=self.grad_sample_mode,
                max_grad_norm=self.max_grad_norm,
            )
        except Exception as err:  # not the check's to judge: a real error recurs in step one
            warnings.warn(
                "DPSGD could not rehearse the first training step on a copy of the model, so "
                "the check for in-place writes Opacus's hooks forbid is skipped: "
                f"{type(err).__name__}: {err}",
                RuntimeWarning,
                stacklevel=3,
            )
            return []

    # ------------------------------------------------------------------ 3. resolve
    def resolve(
        self,
        *,
        dataset_size: int,
        batches_per_epoch: int,
        steps_per_epoch: int,
        planned_epochs: int | None = None,
        saved: Mapping[str, Any] | None = None,
    ) -> DPSGDPlan:
        """Fix δ, ``q`` and ``z`` for this run (``saved``: a checkpoint's, which take precedence).

        Raises:
            ValueError: If ``target_delta >= 1 / N``, or ``target_epsilon`` has no planned epochs.
        """
        saved = saved or {}
        delta = self._delta(dataset_size, saved.get("delta"))
        sample_rate = 1.0 / batches_per_epoch
        z = self._noise_multiplier(
            saved.get("noise_multiplier"),
            planned_epochs,
            delta=delta,
            sample_rate=sample_rate,
            steps_per_epoch=steps_per_epoch,
        )
        self.plan = DPSGDPlan(dataset_size, sample_rate, steps_per_epoch, delta, z)
        return self.plan

    def _delta(self, n: int, saved: float | None) -> float:
        if self.target_delta is None:
            return float(saved) if saved is not None else 1.0 / (10.0 * n)
        return check_delta_for_dataset(self.target_delta, n, "target_delta")

    def _noise_multiplier(
        self,
        saved: float | None,
        planned_epochs: int | None,
        *,
        delta: float,
        sample_rate: float,
        steps_per_epoch: int,
    ) -> float:
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        if saved is not None:
            return float(saved)
        epochs = self.epochs or planned_epochs
        if epochs is None or epochs < 1:
            raise ValueError(
                "Expected `epochs` (the planned number of epochs) with `target_epsilon` when the "
                f"Trainer has no max_epochs, but got epochs=None, max_epochs={planned_epochs!r}."
            )
        assert self.target_epsilon is not None  # one of the two is given (checked in __init__)
        return dpsgd_noise_multiplier(
            target_epsilon=self.target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=epochs * steps_per_epoch,
            accountant=self.accountant_name,
        )

    def _require_plan(self) -> DPSGDPlan:
        if self.plan is None:
            raise RuntimeError("DPSGDEngine.resolve() must run before this phase.")
        return self.plan

    # ------------------------------------------------------------------ 4. make private
    def make_private(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader[Any]
    ) -> tuple[torch.optim.Optimizer, DataLoader[Any]]:
        """Attach Opacus to ``module`` (hooks, no wrapper); the DP optimizer and Poisson loader.

        ``module`` may be a ``DistributedDataParallel`` wrapper: its own all-reduce of the
        unclipped gradients is then replaced by a no-op communication hook. The module comes
        back hook-free, as between steps: :meth:`attach_hooks` before each step's forward,
        :meth:`detach_hooks` after its backward.
        """
        from opacus import PrivacyEngine

        plan = self._require_plan()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            engine = PrivacyEngine(accountant=self.accountant_name, secure_mode=self.secure_mode)
        engine.accountant = self.accountant.opacus_accountant
        self._attached = _attribute_snapshot(module)
        modes = {name: sub.training for name, sub in module.named_modules()}
        module.train()  # Opacus checks train mode; the Trainer sets the modes it wants later
        try:
            out = engine.make_private(
                module=module,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                poisson_sampling=self.poisson_sampling,
                grad_sample_mode=self.grad_sample_mode,
                wrap_model=False,
            )
        finally:
            for name, sub in module.named_modules():
                sub.training = modes[name]
        self._hooks, self._optimizer = out[0], out[1]
        self.detach_hooks()  # hook-free until the first step's attach_hooks, as between steps
        if isinstance(module, nn.parallel.DistributedDataParallel):
            _silence_ddp_allreduce(module)
        return out[1], out[-1]

    def attach_hooks(self) -> None:
        """Attach the per-sample-gradient hooks for the coming forward and backward pass."""
        hooks = self._hooks
        if hooks is not None and not hasattr(hooks, "autograd_grad_sample_hooks"):
            hooks.add_hooks(
                loss_reduction=hooks.loss_reduction,
                batch_first=hooks.batch_first,
                force_functorch=hooks.force_functorch,
            )

    def detach_hooks(self) -> None:
        """Remove the hooks once ``grad_sample`` is computed (the module is hook-free between)."""
        if self._hooks is not None:
            self._hooks.remove_hooks()

    def backward(self, loss: Tensor, backward_mean: Callable[[Tensor], Any]) -> None:
        """Back-propagate a scalar loss or per-sample losses ``[batch]``.

        ``backward_mean`` is the caller's usual backward (Lightning's); per-sample losses go
        through it as their mean, or through Opacus's two-pass ghost-clipping backward in
        ``grad_sample_mode="ghost"``, which needs them.
        """
        ghost = self.grad_sample_mode == "ghost"
        if loss.ndim == 0 and ghost:
            raise ValueError(_GHOST_NEEDS_PER_SAMPLE)
        if loss.ndim > 1:
            raise ValueError(
                "Expected training_step to return a scalar loss or per-sample losses of shape "
                f"[batch], but got shape {tuple(loss.shape)}."
            )
        if not ghost:
            backward_mean(loss if loss.ndim == 0 else loss.mean())
            return
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        DPTensorFastGradientClipping(self._hooks, self._optimizer, loss, "mean").backward()

    # ------------------------------------------------------------------ 5. release
    def release(self, module: nn.Module) -> None:
        """Remove Opacus's hooks and every attribute it left on the hooked layers and parameters."""
        if self._hooks is None:
            return
        self._hooks.cleanup()
        for obj in _hookable(module):
            for key in set(vars(obj)) - self._attached.get(id(obj), set(vars(obj))):
                delattr(obj, key)
        self._hooks, self._optimizer, self._attached = None, None, {}

    @property
    def is_private(self) -> bool:
        """Whether Opacus is attached (between :meth:`make_private` and :meth:`release`)."""
        return self._hooks is not None

    # ------------------------------------------------------------------ accounting
    def epsilon(self) -> float:
        """ε spent so far at the plan's δ (``0.0`` before :meth:`resolve` or any step)."""
        return 0.0 if self.plan is None else self.accountant.get_epsilon(self.plan.delta)

    def epsilon_after(self, steps: int) -> float:
        """ε after ``steps`` more noisy steps at the plan's ``z`` and ``q`` (nothing recorded)."""
        plan = self._require_plan()
        return self.accountant.epsilon_after(
            plan.delta,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=steps,
        )


def _check_noise(
    noise_multiplier: float | None, target_epsilon: float | None
) -> tuple[float | None, float | None]:
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            "Expected exactly one of `noise_multiplier` and `target_epsilon`, but got "
            f"noise_multiplier={noise_multiplier!r} and target_epsilon={target_epsilon!r}."
        )
    if noise_multiplier is not None:
        return check_float("noise_multiplier", noise_multiplier, low=0.0), None
    return None, check_float("target_epsilon", target_epsilon, low=0.0, low_open=True)


def _check_secure_mode(secure_mode: bool) -> bool:
    if check_bool("secure_mode", secure_mode):
        try:
            import torchcsprng  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "DPSGD(secure_mode=True) needs the `torchcsprng` package for secure noise "
                "and sampling; install it or use secure_mode=False for experiments."
            ) from err
    return secure_mode


def _hookable(module: nn.Module) -> list[Any]:
    """The layers Opacus hooks (those with trainable parameters of their own) and the parameters."""
    layers = [
        sub
        for sub in module.modules()
        if any(p.requires_grad for p in sub.parameters(recurse=False))
    ]
    return layers + [p for layer in layers for p in layer.parameters(recurse=False)]


def _attribute_snapshot(module: nn.Module) -> dict[int, set[str]]:
    """The attribute names of every hookable layer and parameter, by ``id``."""
    return {id(obj): set(vars(obj)) for obj in _hookable(module)}


def _silence_ddp_allreduce(ddp: nn.parallel.DistributedDataParallel) -> None:
    """Register a no-op DDP communication hook: Opacus all-reduces the clipped sums itself."""
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

    try:
        ddp.register_comm_hook(None, noop_hook)
    except RuntimeError as err:
        raise RuntimeError(
            "DPSGD registers a no-op DDP communication hook (Opacus all-reduces the clipped "
            "sums itself), but the DDP model already has one; remove the other hook "
            "(GradientDefense placement='local' does not compose with DP-SGD)."
        ) from err
