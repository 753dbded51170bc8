"""I2F leakage estimates for a defense pipeline: δ from the transforms, per sample and per class.

The attacker observes ``g + δ`` where ``δ = defended - original`` comes from the
``GradientTransform`` pipeline in use (noise, pruning, clipping + noise, ...). Each example of a
held-out batch is taken as a gradient shared alone (the most exposed case, and the paper's
protocol) and estimated by a registered estimator (:data:`ESTIMATORS`): ``"exact"``,
``"expected"`` and ``"lower_bound"`` live here, each written once against the example's Gram
solver -- ``J Jᵀ`` assembled and factorised once and reused for every δ draw, the Gaussian
expectation and ``λ_max``, or matrix-free for large inputs. Results are per sample, with the batch
mean, the worst sample and the worst class (the unfairness the paper points at), and the PSNR a
perfect attacker would reach.

Example:
    >>> import torch
    >>> from lightning_privacy.defenses.base import GradientTransform
    >>> class Noise(GradientTransform):
    ...     def __call__(self, gradients, *, generator=None):
    ...         return [g + 1e-3 * torch.randn(g.shape, generator=generator) for g in gradients]
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    >>> x, y = torch.randn(3, 4), torch.tensor([0, 1, 1])
    >>> est = estimate_leakage(model, x, y, transforms=[Noise()], generator=torch.Generator())
    >>> est.per_sample_i2f.shape, sorted(est.per_class_predicted_psnr)
    (torch.Size([3]), [0, 1])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_privacy._validation import check_choice, check_float, check_int
from lightning_privacy.defenses.base import GradientTransform, apply_transforms
from lightning_privacy.functional.gradients import LossFn, select_parameters
from lightning_privacy.functional.leakage import (
    METHODS,
    PRECONDITIONERS,
    GramSolver,
    LanczosResult,
    LeakageOperator,
    MeasurementTimeoutError,
    PreconditionedGramSolver,
)
from lightning_privacy.functional.leakage_products import PREFIX_RATIO
from lightning_privacy.functional.precision import full_precision
from lightning_privacy.leakage.base import (
    ESTIMATORS,
    LANCZOS_ITERATIONS,
    PCG_ITERATIONS,
    VALIDATED_RELATIVE_PERTURBATION,
    EstimationContext,
    LeakageEstimate,
    LeakageEstimator,
    ProductCount,
    SampleEstimate,
    defense_delta,
    mean_square_norm,
)

#: Lanczos steps of ``"approximate"``'s ``λ_max`` at most.
APPROXIMATE_LANCZOS = 24

__all__ = [
    "ESTIMATORS",
    "VALIDATED_RELATIVE_PERTURBATION",
    "ApproximateI2F",
    "ExactI2F",
    "ExpectedI2F",
    "LeakageEstimate",
    "LowerBound",
    "defense_delta",
    "estimate_leakage",
    "split_gaussian_pipeline",
]


def _gaussian_noise_type() -> type | None:
    from lightning_privacy import defenses

    return getattr(defenses, "GaussianNoise", None)


def split_gaussian_pipeline(
    transforms: Sequence[GradientTransform],
) -> tuple[list[GradientTransform], float]:
    """Split ``[deterministic..., GaussianNoise(std)]`` into the deterministic part and ``std``.

    The closed-form expectation needs the noise to be the last, and only random, transform.

    Raises:
        ValueError: If the pipeline is not of that form.

    Example:
        >>> split_gaussian_pipeline([])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected a pipeline ending in one GaussianNoise (...) ... but got []. ...
    """
    noise_type = _gaussian_noise_type()
    transforms = list(transforms)
    ok = (
        noise_type is not None
        and bool(transforms)
        and isinstance(transforms[-1], noise_type)
        and not any(isinstance(t, noise_type) for t in transforms[:-1])
    )
    if ok:
        probe = [torch.linspace(-1.0, 1.0, 64)]
        first = apply_transforms(transforms[:-1], probe, generator=torch.Generator().manual_seed(1))
        second = apply_transforms(
            transforms[:-1], probe, generator=torch.Generator().manual_seed(2)
        )
        ok = all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    if not ok:
        raise ValueError(
            "Expected a pipeline ending in one GaussianNoise (deterministic transforms such as "
            f"clipping may come before it) for estimator='expected', but got {transforms!r}. "
            "Use estimator='exact', which draws δ from any pipeline."
        )
    return transforms[:-1], float(transforms[-1].std)  # type: ignore[attr-defined]


def _mean_over_draws(
    op: LeakageOperator, context: EstimationContext, solver: GramSolver
) -> SampleEstimate:
    """The I2F of the context's δ draws through ``solver``, averaged, with their lower bound."""
    deltas = context.draw_deltas(op)
    jdelta = op.jdelta_rows(deltas)
    solution, lanczos = solver.solve_with_lanczos(jdelta)
    return context.sample_estimate(
        op,
        i2f=float(solution.solution.norm(dim=-1).mean()),
        lower_bound=_mean_lower_bound(jdelta, lanczos),
        lanczos=lanczos,
        delta_sq_norm=mean_square_norm(deltas),
    )


def _mean_lower_bound(jdelta: Tensor, lanczos: LanczosResult) -> float:
    """Mean of ``‖J δ‖ / λ_max`` over the rows of ``jdelta``."""
    return float((jdelta.norm(dim=-1) / lanczos.value).mean())


@ESTIMATORS.register("exact")
@dataclass(frozen=True)
class ExactI2F(LeakageEstimator):
    """Mean I2F ``‖(J Jᵀ + λ I)⁻¹ J δ‖`` of ``num_delta_samples`` draws of δ from any pipeline.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> op = LeakageOperator(model, torch.randn(1, 3), torch.tensor([0]))
        >>> ExactI2F().estimate(op, EstimationContext()).i2f  # no defense: δ = 0
        0.0
    """

    def estimate(self, op: LeakageOperator, context: EstimationContext) -> SampleEstimate:
        """The mean over the draws, with the lower bound of the same draws."""
        return _mean_over_draws(op, context, context.gram_solver(op))


@ESTIMATORS.register("expected")
@dataclass(frozen=True)
class ExpectedI2F(LeakageEstimator):
    """``sqrt(E I2F²)`` in closed form for ``[deterministic..., GaussianNoise(std)]``, no draws.

    With ``b`` the residual of the deterministic part (clipping, ...) and ``δ = b + N(0, std² I)``
    on the defended entries: ``E I2F² = ‖(J Jᵀ + λ I)⁻¹ J b‖² + std² Σ λ_i / (λ_i + λ)²`` and
    ``E ‖J δ‖² = ‖J b‖² + std² tr(J Jᵀ)``. Matrix-free, both traces are Hutchinson estimates with
    ``num_delta_samples`` probes.

    Example:
        >>> ExpectedI2F().check_defense([])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected a pipeline ending in one GaussianNoise ...
    """

    def check_defense(self, transforms: Sequence[GradientTransform]) -> None:
        """Accept only ``[deterministic..., GaussianNoise]`` (:func:`split_gaussian_pipeline`)."""
        split_gaussian_pipeline(transforms)

    def products(self, input_dim: int, context: EstimationContext) -> ProductCount:
        """Dense: the columns; matrix-free: one solve per probe and for the bias, one trace.

        Example:
            >>> ExpectedI2F().products(64, EstimationContext(num_delta_samples=4, method="cg"))
            ProductCount(columns=0, solves=0, single=649, prefix=0, solve_width=0)
        """
        probes = context.num_delta_samples
        method = context.resolved_method(input_dim)
        if method == "dense":
            return ProductCount(columns=input_dim, single=1)
        if method == "pcg":
            solves = PCG_ITERATIONS * (probes + 1) + probes
            return ProductCount(prefix=input_dim, solves=solves, single=LANCZOS_ITERATIONS + 1)
        per_solve = 1 + min(input_dim, 200)
        return ProductCount(single=LANCZOS_ITERATIONS + (2 * probes + 1) * per_solve)

    def estimate(self, op: LeakageOperator, context: EstimationContext) -> SampleEstimate:
        """The closed-form root-mean-square I2F and the bound from ``E ‖J δ‖²``."""
        deterministic, std = split_gaussian_pipeline(context.transforms)
        solver = context.gram_solver(op)
        lanczos = solver.lanczos()
        bias = context.draw_deltas(op, deterministic, num_draws=1)
        jbias = op.jdelta_rows(bias)
        i2f_sq = float(solver.solve_norms(jbias)[0] ** 2) + std**2 * solver.trace_inverse()
        jdelta_sq = float(jbias.norm() ** 2) + std**2 * solver.trace()
        return context.sample_estimate(
            op,
            i2f=math.sqrt(i2f_sq),
            lower_bound=math.sqrt(jdelta_sq) / lanczos.value,
            lanczos=lanczos,
            delta_sq_norm=mean_square_norm(bias) + std**2 * context.defended_size(op),
        )


@ESTIMATORS.register("lower_bound")
@dataclass(frozen=True)
class LowerBound(LeakageEstimator):
    """``‖J δ‖ / λ_max`` only: cheap, but it tracks the noise size, not which images leak.

    ``λ_max`` comes from matrix-free Lanczos whatever ``method`` says: ``J Jᵀ`` is never
    assembled. Only a bound (``predicts_i2f = False``): its PSNR is logged as
    ``leakage/psnr_upper_bound``, never under the keys of a prediction.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> op = LeakageOperator(model, torch.randn(1, 3), torch.tensor([0]))
        >>> LowerBound().estimate(op, EstimationContext()).lower_bound  # no defense: δ = 0
        0.0
    """

    predicts_i2f: ClassVar[bool] = False

    def products(self, input_dim: int, context: EstimationContext) -> ProductCount:
        """Lanczos on the matrix-free Gram product, plus one ``J δ`` per draw.

        Example:
            >>> LowerBound().products(3072, EstimationContext(num_delta_samples=4)).total
            132
        """
        return ProductCount(single=2 * LANCZOS_ITERATIONS + context.num_delta_samples)

    def estimate(self, op: LeakageOperator, context: EstimationContext) -> SampleEstimate:
        """The mean bound over the draws (both ``i2f`` and ``lower_bound``)."""
        lanczos = context.gram_solver(op, method="cg").lanczos()
        deltas = context.draw_deltas(op)
        bound = _mean_lower_bound(op.jdelta_rows(deltas), lanczos)
        return context.sample_estimate(
            op,
            i2f=bound,
            lower_bound=bound,
            lanczos=lanczos,
            delta_sq_norm=mean_square_norm(deltas),
        )


@ESTIMATORS.register("approximate")
@dataclass(frozen=True)
class ApproximateI2F(LeakageEstimator):
    """The I2F of the draws by preconditioned CG stopped early: a fraction of ``"exact"``'s cost.

    The same quantity as ``"exact"`` (the mean I2F of ``num_delta_samples`` draws of δ from any
    pipeline), solved matrix-free whatever the input size: block conjugate gradients on
    ``J Jᵀ b = J δ`` (:func:`~lightning_privacy.functional.leakage.block_conjugate_gradient`),
    the draws padded with random vectors to ``block_size`` rows (at most one batched pass of
    products), all sharing one Krylov space, preconditioned by a Gram matrix of the first layers
    (``preconditioner``; see
    :class:`~lightning_privacy.functional.leakage.PreconditionedGramSolver`), and stopped once
    each draw's preconditioned residual ``sqrt(rᵀ M⁻¹ r / bᵀ M⁻¹ b)`` falls below ``tol`` or after
    ``max_iterations``. ``λ_max`` (for the lower bound) comes from a few Lanczos steps to
    ``lanczos_tol`` whose vector rides in the same batched products.

    Why a block: a batched ``J Jᵀ`` product of 9 rows costs 1.2 times one of 5 on torchvision
    ResNet-18 (59 against 50 ms here), and each iteration widens the shared space by every row,
    so the small eigenvalues that hold single solves back are found in fewer sequential passes:
    one ResNet-18 3x32x32 example needed 23 iterations instead of 31 at ``tol=1e-1`` (18 with a
    block of 16); on timm ViT-Tiny, whose ``J Jᵀ`` is far worse conditioned, independent solves
    stopped at ``tol=1e-1`` came out 11 % low after 60 iterations, and the default block 1.1 %
    low (``benchmarks/i2f_scale.py``).

    For ReLU networks whose first layer reads the input (a CNN's stem, a ViT's patch
    embedding), ``"auto"`` takes that layer's Gram matrix in closed form
    (:mod:`~lightning_privacy.functional.leakage_stem`): on torchvision ResNet-18 3x32x32 it
    costs 0.15 s where the generic first layers cost 8-11 s of column passes, for 30 iterations
    instead of 24.

    Error model: CG from zero approaches the solution from below in the norm of ``M``, so the
    estimate errs low; with ``M ≈ J Jᵀ`` the preconditioned residual is the relative error in
    the energy norm. The norm of the solution converges faster than that residual: at
    ``tol=1e-1`` the I2F came out 0.2-1 % low on torchvision ResNet-18 3x32x32 (3 examples, 4
    draws, block sizes 8-16; ``tol=1.5e-1`` 0.5-2 %, ``2e-1`` 1-3 %), and
    ``benchmarks/i2f_scale.py`` reports the median ratio and the Spearman correlation with the
    exact estimate beside the cost on five models. Not converged within ``max_iterations`` it is
    a lower estimate; a preconditioner far from ``J Jᵀ`` (the 2-norm of the iterates is not
    monotone) can leave it up to about 1 % high.

    Args:
        tol: Preconditioned relative residual at which a solve stops.
        max_iterations: Iterations per solve at most.
        prefix_ratio: With the ``"prefix"`` preconditioner, its layers hold
            ``prefix_ratio * d_x`` parameters.
        preconditioner: ``"auto"``, ``"stem"`` or ``"prefix"``
            (:data:`~lightning_privacy.functional.leakage.PRECONDITIONERS`).
        lanczos_tol: Relative Ritz residual of ``λ_max``.
        block_size: Rows of the block solve: the draws padded with random vectors
            (:func:`~lightning_privacy.functional.leakage.block_conjugate_gradient`); ``0``
            solves each draw alone.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> op = LeakageOperator(model, torch.randn(1, 3), torch.tensor([0]))
        >>> ApproximateI2F().estimate(op, EstimationContext()).i2f  # no defense: δ = 0
        0.0
    """

    tol: float = 1e-1
    max_iterations: int = 48
    prefix_ratio: float = PREFIX_RATIO
    lanczos_tol: float = 1e-3
    preconditioner: str = "auto"
    block_size: int = 8

    def __post_init__(self) -> None:
        check_float("tol", self.tol, low=0.0, low_open=True)
        check_int("block_size", self.block_size, low=0)
        check_int("max_iterations", self.max_iterations, low=1)
        check_float("prefix_ratio", self.prefix_ratio, low=0.0)
        check_float("lanczos_tol", self.lanczos_tol, low=0.0, low_open=True)
        check_choice("preconditioner", self.preconditioner, PRECONDITIONERS)

    def products(self, input_dim: int, context: EstimationContext) -> ProductCount:
        """The preconditioner, ``max_iterations`` batched iterations carrying a short Lanczos.

        Example:
            >>> ApproximateI2F().products(3072, EstimationContext(num_delta_samples=4))
            ProductCount(columns=0, solves=408, single=4, prefix=3072, solve_width=8)
        """
        rows = max(self.block_size, context.num_delta_samples)
        return ProductCount(
            prefix=input_dim,
            solves=self.max_iterations * rows + APPROXIMATE_LANCZOS,
            single=context.num_delta_samples,
            solve_width=rows,
        )

    def estimate(self, op: LeakageOperator, context: EstimationContext) -> SampleEstimate:
        """The mean over the draws of the early-stopped solves, with their lower bound."""
        solver = PreconditionedGramSolver.build(
            op,
            ratio=self.prefix_ratio,
            deadline=context.deadline,
            damping=context.damping,
            lanczos_seed=context.example_index,
            tol=self.tol,
            max_iterations=self.max_iterations,
            lanczos_tol=self.lanczos_tol,
            lanczos_iterations=APPROXIMATE_LANCZOS,
            preconditioner=self.preconditioner,
            warn=False,
            block_size=self.block_size,
        )
        return _mean_over_draws(op, context, solver)


def _check_batch(inputs: Tensor, targets: Tensor) -> None:
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("Expected `inputs` and `targets` to be tensors.")
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(
            f"Expected `inputs` and `targets` with the same non-zero batch size, but got "
            f"{len(inputs)} and {len(targets)}."
        )


def _defended_indices(
    model: nn.Module,
    layers: str | Sequence[str] | None,
    defense_layers: str | Sequence[str] | None,
) -> tuple[int, ...]:
    """Indices, among the observed parameters, of those the defense acts on."""
    observed = list(select_parameters(model, layers))
    acting = list(select_parameters(model, defense_layers))
    return tuple(observed.index(n) for n in acting if n in observed)


@full_precision()
def estimate_leakage(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    transforms: Sequence[GradientTransform],
    estimator: str | LeakageEstimator = "exact",
    num_delta_samples: int = 4,
    damping: float = 0.0,
    loss_fn: LossFn = F.cross_entropy,
    layers: str | Sequence[str] | None = None,
    defense_layers: str | Sequence[str] | None = None,
    data_range: float = 1.0,
    generator: torch.Generator | None = None,
    method: str = "auto",
    dense_limit: int = 4096,
    max_seconds: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LeakageEstimate:
    """Estimate, per example shared alone, how well a perfect attacker rebuilds it under a defense.

    Args:
        model: The network (read only; put it in the mode the shared gradient is computed in).
        inputs: Held-out examples ``(B, ...)``, floating point.
        targets: Their labels ``(B,)``.
        transforms: The defense pipeline the attacker faces (``GradientDefense.transforms``).
        estimator: A name in :data:`ESTIMATORS` (or an estimator object): ``"exact"`` (I2F of
            ``num_delta_samples`` draws of δ), ``"approximate"`` (the same by preconditioned
            conjugate gradients stopped early: a fraction of the cost, a few per cent low),
            ``"expected"`` (``sqrt(E I2F²)`` in closed form for ``[deterministic...,
            GaussianNoise]``, no draws) or ``"lower_bound"`` (``‖J δ‖ / λ_max`` only; cheap, but it
            tracks noise size, not which images leak).
        num_delta_samples: δ draws per example for ``"exact"``, ``"approximate"`` and
            ``"lower_bound"`` (Hutchinson probes for a matrix-free ``"expected"``).
        damping: ``λ >= 0`` (keep 0: damping hides which images leak).
        loss_fn: Loss with the reduction of the shared gradient.
        layers: Parameters whose gradient the attacker observes (default: all trainable).
        defense_layers: Parameters the transforms act on (``GradientDefense(layers=)``); δ is zero
            on the others. Default: all observed ones.
        data_range: Input value range for the predicted PSNR.
        generator: Source of the defense's randomness (and of the Lanczos start vectors).
        method: ``"dense"`` (assemble and factorise ``J Jᵀ`` once per example from ``d_x``
            columns, formed many at a time; then every draw and the expectation are exact and
            cheap), ``"pcg"`` (matrix-free conjugate gradients to ``1e-6``, preconditioned by the
            first layers' Gram matrix), ``"cg"`` (matrix-free, unpreconditioned: slow), or
            ``"auto"`` (dense when ``d_x <= dense_limit``, else ``"pcg"``). ``"approximate"``
            is always matrix-free.
        dense_limit: Largest per-example input size for the dense path under ``"auto"``.
        max_seconds: Wall-time bound of the whole call. No example starts after it, and the one
            running when it passes stops at its next batch of products and is dropped: the
            estimate covers the examples finished (:attr:`LeakageEstimate.complete` is false).
            If not even the first example finishes, ``TimeoutError``.
        progress: Called with ``(examples done, examples)`` after each example.

    Returns:
        A :class:`LeakageEstimate`.

    Raises:
        TimeoutError: If ``max_seconds`` passes before the first example is finished.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
        >>> est = estimate_leakage(model, torch.randn(2, 4), torch.tensor([0, 1]), transforms=[],
        ...                        estimator="lower_bound")
        >>> est.i2f, est.complete
        (0.0, True)
    """
    name, component = _estimator(estimator)
    check_choice("method", method, METHODS)
    dense_limit = check_int("dense_limit", dense_limit, low=0)
    num_delta_samples = check_int("num_delta_samples", num_delta_samples, low=1)
    damping = check_float("damping", damping, low=0.0)
    data_range = check_float("data_range", data_range, low=0.0, low_open=True)
    _check_batch(inputs, targets)
    deadline = None
    if max_seconds is not None:
        deadline = time.perf_counter() + check_float("max_seconds", max_seconds, low=0.0)
    context = EstimationContext(
        transforms=tuple(transforms),
        defended=_defended_indices(model, layers, defense_layers),
        num_delta_samples=num_delta_samples,
        damping=damping,
        generator=generator,
        method=method,
        dense_limit=dense_limit,
        data_range=data_range,
        deadline=deadline,
    )
    component.check_defense(context.transforms)
    samples = _estimate_each(component, context, model, inputs, targets, loss_fn, layers, progress)
    if not samples:  # only a deadline empties it
        raise TimeoutError(
            f"No example finished within max_seconds={max_seconds}: one example of this model "
            "needs more (see estimate_cost); raise max_seconds or use a cheaper estimator "
            "('approximate', or 'lower_bound' for a bound)."
        )
    return LeakageEstimate.from_samples(
        name, samples, targets[: len(samples)], requested=len(inputs)
    )


def _estimate_each(
    component: LeakageEstimator,
    context: EstimationContext,
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    layers: str | Sequence[str] | None,
    progress: Callable[[int, int], None] | None,
) -> list[SampleEstimate]:
    """One estimate per example, in order, until the context's deadline (none started after it)."""
    samples: list[SampleEstimate] = []
    deadline = context.deadline
    for i in range(len(inputs)):
        if samples and deadline is not None and time.perf_counter() > deadline:
            break
        try:
            op = LeakageOperator(
                model, inputs[i : i + 1], targets[i : i + 1], loss_fn=loss_fn, layers=layers
            )
            samples.append(component.estimate(op, replace(context, example_index=i)))
        except MeasurementTimeoutError:
            break
        if progress is not None:
            progress(len(samples), len(inputs))
    return samples


def _estimator(estimator: str | LeakageEstimator) -> tuple[str, LeakageEstimator]:
    """``(name, component)`` of a registered name or an estimator object."""
    if isinstance(estimator, LeakageEstimator):
        names = [n for n in ESTIMATORS if ESTIMATORS.get(n) is type(estimator)]
        return (names[0] if names else type(estimator).__name__), estimator
    check_choice("estimator", estimator, ESTIMATORS)
    return estimator, ESTIMATORS.create(estimator)
