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
from lightning_privacy.functional.leakage import LanczosResult, LeakageOperator
from lightning_privacy.leakage.base import (
    ESTIMATORS,
    LANCZOS_ITERATIONS,
    VALIDATED_RELATIVE_PERTURBATION,
    EstimationContext,
    LeakageEstimate,
    LeakageEstimator,
    SampleEstimate,
    defense_delta,
    mean_square_norm,
)

__all__ = [
    "ESTIMATORS",
    "VALIDATED_RELATIVE_PERTURBATION",
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
        solver = context.gram_solver(op)
        lanczos = solver.lanczos()
        deltas = context.draw_deltas(op)
        jdelta = op.jdelta_rows(deltas)
        return context.sample_estimate(
            op,
            i2f=float(solver.solve_norms(jdelta).mean()),
            lower_bound=_mean_lower_bound(jdelta, lanczos),
            lanczos=lanczos,
            delta_sq_norm=mean_square_norm(deltas),
        )


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

    def products(self, input_dim: int, context: EstimationContext) -> int:
        """Lanczos on the matrix-free Gram product, plus one ``J δ`` per draw.

        Example:
            >>> LowerBound().products(3072, EstimationContext(num_delta_samples=4))
            132
        """
        return 2 * LANCZOS_ITERATIONS + context.num_delta_samples

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


def estimate_leakage(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    transforms: Sequence[GradientTransform],
    estimator: str = "exact",
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
        estimator: A name in :data:`ESTIMATORS`: ``"exact"`` (I2F of ``num_delta_samples`` draws
            of δ), ``"expected"`` (``sqrt(E I2F²)`` in closed form for
            ``[deterministic..., GaussianNoise]``, no draws) or ``"lower_bound"``
            (``‖J δ‖ / λ_max`` only; cheap, but it tracks noise size, not which images leak).
        num_delta_samples: δ draws per example for ``"exact"`` and ``"lower_bound"``.
        damping: ``λ >= 0`` (keep 0: damping hides which images leak).
        loss_fn: Loss with the reduction of the shared gradient.
        layers: Parameters whose gradient the attacker observes (default: all trainable).
        defense_layers: Parameters the transforms act on (``GradientDefense(layers=)``); δ is zero
            on the others. Default: all observed ones.
        data_range: Input value range for the predicted PSNR.
        generator: Source of the defense's randomness (and of the Lanczos start vectors).
        method: ``"dense"`` (assemble and factorise ``J Jᵀ`` once per example: ``2 d_x`` batched
            products, then every draw and the expectation are exact and cheap), ``"cg"``
            (matrix-free: conjugate gradients per draw, Hutchinson's trace estimate with
            ``num_delta_samples`` probes for ``"expected"``), or ``"auto"`` (dense when
            ``d_x <= dense_limit``).
        dense_limit: Largest per-example input size for the dense path under ``"auto"``.
        max_seconds: Start no further example once this much wall time has passed (the first
            one always runs); the estimate then covers the examples done (compare its length
            with the batch's).
        progress: Called with ``(examples done, examples)`` after each example.

    Returns:
        A :class:`LeakageEstimate`.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
        >>> est = estimate_leakage(model, torch.randn(2, 4), torch.tensor([0, 1]), transforms=[],
        ...                        estimator="lower_bound")
        >>> est.i2f
        0.0
    """
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("method", method, ("auto", "dense", "cg"))
    dense_limit = check_int("dense_limit", dense_limit, low=0)
    num_delta_samples = check_int("num_delta_samples", num_delta_samples, low=1)
    damping = check_float("damping", damping, low=0.0)
    data_range = check_float("data_range", data_range, low=0.0, low_open=True)
    _check_batch(inputs, targets)
    context = EstimationContext(
        transforms=tuple(transforms),
        defended=_defended_indices(model, layers, defense_layers),
        num_delta_samples=num_delta_samples,
        damping=damping,
        generator=generator,
        method=method,
        dense_limit=dense_limit,
        data_range=data_range,
    )
    component = ESTIMATORS.create(estimator)
    component.check_defense(context.transforms)
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    samples: list[SampleEstimate] = []
    for i in range(len(inputs)):
        if samples and deadline is not None and time.perf_counter() > deadline:
            break
        op = LeakageOperator(
            model, inputs[i : i + 1], targets[i : i + 1], loss_fn=loss_fn, layers=layers
        )
        samples.append(component.estimate(op, replace(context, example_index=i)))
        if progress is not None:
            progress(len(samples), len(inputs))
    return LeakageEstimate.from_samples(estimator, samples, targets[: len(samples)])
