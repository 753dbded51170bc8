"""I2F leakage estimates for a defense pipeline: δ from the transforms, per sample and per class.

The attacker observes ``g + δ`` where ``δ = defended - original`` comes from the
``GradientTransform`` pipeline in use (noise, pruning, clipping + noise, ...). For each example of
a held-out batch (shared alone: the most exposed case, and the paper's protocol) this module
assembles and factorises ``J Jᵀ`` once, then reuses it for every δ draw, the Gaussian expectation
and ``λ_max``. Results are per sample, with the batch mean, the worst sample and the worst class
(the unfairness the paper points at), and the PSNR a perfect attacker would reach.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_privacy._validation import check_choice, check_float, check_int
from lightning_privacy.defenses.base import GradientTransform, apply_transforms
from lightning_privacy.functional.gradients import LossFn, select_parameters
from lightning_privacy.functional.leakage import (
    GramFactorization,
    LanczosResult,
    LeakageOperator,
    hutchinson_trace_inverse,
    i2f_from_operator,
    lanczos_lambda_max,
    predicted_psnr,
)

ESTIMATORS = ("exact", "expected", "lower_bound")

#: ``‖δ‖ / ‖g‖`` up to which the I2F was checked against a converged attack (README, I2F fidelity:
#: error ÷ I2F 0.95-1.16, rank correlation >= 0.92). Beyond it the first-order expansion departs
#: from the attack (an unclamped attack does worse than predicted) and the estimate is uncalibrated.
VALIDATED_RELATIVE_PERTURBATION = 0.06


def defense_delta(
    transforms: Sequence[GradientTransform],
    gradients: Sequence[Tensor],
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """One draw of ``δ = defended - original`` for any transform pipeline.

    Args:
        transforms: The ``GradientTransform`` pipeline (applied in order, as in the Trainer).
        gradients: The original gradients (not modified).
        generator: Source of the defense's randomness.

    Returns:
        ``δ`` per gradient tensor.

    Example:
        >>> from lightning_privacy.defenses.base import GradientTransform
        >>> class Halve(GradientTransform):
        ...     def __call__(self, gradients, *, generator=None):
        ...         return [g / 2 for g in gradients]
        >>> defense_delta([Halve()], [torch.ones(2)])
        [tensor([-0.5000, -0.5000])]
    """
    gradients = list(gradients)
    defended = apply_transforms(transforms, gradients, generator=generator)
    return [d - g for d, g in zip(defended, gradients, strict=True)]


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


@dataclass(frozen=True)
class LeakageEstimate:
    """Per-sample I2F estimates for a held-out batch and their summaries.

    Attributes:
        estimator: ``"exact"``, ``"expected"`` or ``"lower_bound"`` (what ``per_sample_i2f`` is).
        per_sample_i2f: ``(B,)`` the estimate per example (mean over δ draws for ``"exact"``;
            root-mean-square ``sqrt(E I2F²)`` for ``"expected"``).
        per_sample_lower_bound: ``(B,)`` ``‖J δ‖ / λ_max`` (mean over the same draws).
        lambda_max: ``(B,)`` ``λ_max(J Jᵀ)`` per example.
        predicted_psnr: ``(B,)`` PSNR a perfect attacker would reach (``MSE = I2F² / d_x``).
        targets: ``(B,)`` the labels, for per-class summaries.
        relative_perturbation: ``(B,)`` ``‖δ‖ / ‖g‖`` per example (root-mean-square over the draws;
            in closed form for ``"expected"``): how far the I2F's linearisation is stretched.
            Above :data:`VALIDATED_RELATIVE_PERTURBATION` the estimate is not calibrated.
        per_class_predicted_psnr: ``{class: mean predicted PSNR}``.
        lanczos: One :class:`LanczosResult` per example (``λ_max`` iterations and convergence).
    """

    estimator: str
    per_sample_i2f: Tensor
    per_sample_lower_bound: Tensor
    lambda_max: Tensor
    predicted_psnr: Tensor
    targets: Tensor
    relative_perturbation: Tensor
    per_class_predicted_psnr: dict[int, float] = field(default_factory=dict)
    lanczos: tuple[LanczosResult, ...] = ()

    @property
    def beyond_validated_range(self) -> bool:
        """Whether some example's ``‖δ‖ / ‖g‖`` exceeds :data:`VALIDATED_RELATIVE_PERTURBATION`."""
        return bool(self.relative_perturbation.max() > VALIDATED_RELATIVE_PERTURBATION)

    @property
    def i2f(self) -> float:
        """Mean I2F over the batch."""
        return float(self.per_sample_i2f.mean())

    @property
    def mean_predicted_psnr(self) -> float:
        """Mean predicted PSNR over the batch (dB)."""
        return float(self.predicted_psnr.mean())

    @property
    def worst_sample_predicted_psnr(self) -> float:
        """Highest predicted PSNR: the least protected example (dB)."""
        return float(self.predicted_psnr.max())

    @property
    def worst_class_predicted_psnr(self) -> float:
        """Highest per-class mean predicted PSNR: the least protected class (dB)."""
        return max(self.per_class_predicted_psnr.values())

    def metrics(self, prefix: str = "leakage/", per_class: bool = False) -> dict[str, float]:
        """Scalars to log: ``i2f``, the bound, ``λ_max``, PSNR summaries, ``‖δ‖ / ‖g‖``."""
        out = {
            f"{prefix}i2f": self.i2f,
            f"{prefix}i2f_lower_bound": float(self.per_sample_lower_bound.mean()),
            f"{prefix}lambda_max": float(self.lambda_max.mean()),
            f"{prefix}predicted_psnr": self.mean_predicted_psnr,
            f"{prefix}worst_sample_predicted_psnr": self.worst_sample_predicted_psnr,
            f"{prefix}worst_class_predicted_psnr": self.worst_class_predicted_psnr,
            f"{prefix}relative_perturbation": float(self.relative_perturbation.mean()),
        }
        if per_class:
            for c, v in sorted(self.per_class_predicted_psnr.items()):
                out[f"{prefix}predicted_psnr/class_{c}"] = v
        return out


def _delta_rows(
    op: LeakageOperator,
    transforms: Sequence[GradientTransform],
    defended: list[int],
    num_draws: int,
    generator: torch.Generator | None,
) -> Tensor:
    grads = list(torch.split(op.gradient, op.numels))
    grads = [g.reshape(s) for g, s in zip(grads, op.shapes, strict=True)]
    rows = []
    for _ in range(num_draws):
        part = defense_delta(transforms, [grads[i] for i in defended], generator)
        full = [torch.zeros_like(g) for g in grads]
        for i, d in zip(defended, part, strict=True):
            full[i] = d
        rows.append(op.flatten_delta(full)[0])
    return torch.stack(rows)


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
) -> LeakageEstimate:
    """Estimate, per example shared alone, how well a perfect attacker rebuilds it under a defense.

    Args:
        model: The network (read only; put it in the mode the shared gradient is computed in).
        inputs: Held-out examples ``(B, ...)``, floating point.
        targets: Their labels ``(B,)``.
        transforms: The defense pipeline the attacker faces (``GradientDefense.transforms``).
        estimator: ``"exact"`` (I2F of ``num_delta_samples`` draws of δ), ``"expected"``
            (``sqrt(E I2F²)`` in closed form for ``[deterministic..., GaussianNoise]``, no draws)
            or ``"lower_bound"`` (``‖J δ‖ / λ_max`` only; cheap, but it tracks noise size, not which
            images leak).
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
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("Expected `inputs` and `targets` to be tensors.")
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(
            f"Expected `inputs` and `targets` with the same non-zero batch size, but got "
            f"{len(inputs)} and {len(targets)}."
        )
    observed = list(select_parameters(model, layers))
    acting = list(select_parameters(model, defense_layers))
    defended = [observed.index(n) for n in acting if n in observed]
    deterministic: list[GradientTransform] = []
    std = 0.0
    if estimator == "expected":
        deterministic, std = split_gaussian_pipeline(transforms)
    values, bounds, lams, psnrs, runs, rels = [], [], [], [], [], []
    for i in range(len(inputs)):
        x, y = inputs[i : i + 1], targets[i : i + 1]
        op = LeakageOperator(model, x, y, loss_fn=loss_fn, layers=layers)
        lam_gen = torch.Generator(device=op.gradient.device).manual_seed(i)
        if estimator == "lower_bound":
            run = lanczos_lambda_max(
                op.gram_matvec,
                op.input_dim,
                generator=lam_gen,
                device=op.gradient.device,
            )
            rows = _delta_rows(op, transforms, defended, num_delta_samples, generator)
            bound = op.jvp(rows).reshape(len(rows), -1).to(torch.float64).norm(dim=-1) / run.value
            value = bound.mean()
            lower = value
        elif method == "dense" or (method == "auto" and op.input_dim <= dense_limit):
            fact = GramFactorization(op.gram(), spectrum=damping > 0)
            run = fact.lanczos(generator=lam_gen)
            if estimator == "exact":
                rows = _delta_rows(op, transforms, defended, num_delta_samples, generator)
                jd = op.jvp(rows).reshape(len(rows), -1).to(torch.float64)
                value = fact.solve(jd, damping).norm(dim=-1).mean()
                lower = (jd.norm(dim=-1) / run.value).mean()
            else:
                bias = _delta_rows(op, deterministic, defended, 1, generator)
                jb = op.jvp(bias).reshape(1, -1).to(torch.float64)
                sq = float(fact.solve(jb, damping).norm() ** 2)
                sq += std**2 * fact.trace_inverse(damping)
                value = torch.tensor(math.sqrt(sq), dtype=torch.float64)
                # E‖Jδ‖² = ‖J b‖² + std² ‖J‖_F² = ‖J b‖² + std² tr(J Jᵀ)
                jsq = float(jb.norm() ** 2) + std**2 * float(torch.trace(fact.gram))
                lower = torch.tensor(math.sqrt(jsq) / run.value, dtype=torch.float64)
        else:  # matrix-free: inputs too large to assemble J Jᵀ
            run = lanczos_lambda_max(
                op.gram_matvec, op.input_dim, generator=lam_gen, device=op.gradient.device
            )
            if estimator == "exact":
                rows = _delta_rows(op, transforms, defended, num_delta_samples, generator)
                res = i2f_from_operator(op, rows, damping=damping, method="cg")
                value = res.value.mean()
                lower = (res.jdelta_norm / run.value).mean()
            else:
                bias = _delta_rows(op, deterministic, defended, 1, generator)
                res = i2f_from_operator(op, bias, damping=damping, method="cg")
                trace = hutchinson_trace_inverse(
                    op, num_probes=num_delta_samples, damping=damping, generator=generator
                )
                value = torch.tensor(
                    math.sqrt(float(res.value[0]) ** 2 + std**2 * trace), dtype=torch.float64
                )
                probes = (
                    torch.randint(0, 2, (num_delta_samples, op.input_dim), generator=generator).to(
                        torch.float64
                    )
                    * 2
                    - 1
                )
                frob = sum(float(z @ op.gram_matvec(z).double()) for z in probes) / len(probes)
                jsq = float(res.jdelta_norm[0]) ** 2 + std**2 * frob
                lower = torch.tensor(math.sqrt(jsq) / run.value, dtype=torch.float64)
        if estimator == "expected":
            noise_dim = sum(op.numels[k] for k in defended)
            sq_norm = float(bias.double().norm() ** 2) + std**2 * noise_dim  # E‖δ‖²
        else:
            sq_norm = float((rows.double().norm(dim=-1) ** 2).mean())
        rels.append(_relative(math.sqrt(sq_norm), float(op.gradient.norm())))
        values.append(value)
        bounds.append(lower)
        lams.append(run.value)
        runs.append(run)
        psnrs.append(predicted_psnr(value, op.input_dim, data_range=data_range))
    per_sample = torch.stack(values).to(torch.float64)
    psnr = torch.stack(psnrs)
    labels = targets.detach().reshape(-1).cpu()
    per_class: dict[int, float] = {}
    for c in torch.unique(labels).tolist():
        per_class[int(c)] = float(psnr[labels == c].mean())
    return LeakageEstimate(
        estimator=estimator,
        per_sample_i2f=per_sample,
        per_sample_lower_bound=torch.stack(bounds).to(torch.float64),
        lambda_max=torch.tensor(lams, dtype=torch.float64),
        predicted_psnr=psnr,
        targets=labels,
        per_class_predicted_psnr=per_class,
        lanczos=tuple(runs),
        relative_perturbation=torch.tensor(rels, dtype=torch.float64),
    )


def _relative(delta_norm: float, gradient_norm: float) -> float:
    if delta_norm == 0.0:
        return 0.0
    return delta_norm / gradient_norm if gradient_norm > 0 else math.inf


@dataclass(frozen=True)
class NoiseCalibration:
    """Result of :func:`calibrate_noise`.

    Attributes:
        std: The smallest Gaussian ``std`` (to the bisection tolerance) whose predicted PSNR is at
            most the target.
        predicted_psnr: The predicted PSNR at ``std`` (after ``reduction``).
        per_sample_predicted_psnr: ``(B,)`` predicted PSNR per example at ``std``.
        iterations: Bisection steps.
    """

    std: float
    predicted_psnr: float
    per_sample_predicted_psnr: Tensor
    iterations: int


def calibrate_noise(
    model: nn.Module,
    batch: Any,
    *,
    target_psnr: float,
    before: Sequence[GradientTransform] = (),
    reduction: str = "worst",
    damping: float = 0.0,
    loss_fn: LossFn = F.cross_entropy,
    layers: str | Sequence[str] | None = None,
    data_range: float = 1.0,
    std_low: float = 1e-10,
    std_high: float = 1e3,
    rel_tol: float = 1e-3,
    max_iterations: int = 200,
) -> NoiseCalibration:
    """The smallest Gaussian noise ``std`` whose predicted attack PSNR is at most ``target_psnr``.

    Noise chosen by leakage, not only by ε. The predicted PSNR at ``std`` uses the expected I2F of
    ``[*before, GaussianNoise(std)]`` (``before``: deterministic transforms such as clipping),
    per example, from one factorisation of ``J Jᵀ`` per example; bisection on ``log std``.

    Args:
        model: The network.
        batch: ``(inputs, targets)`` -- the examples to protect.
        target_psnr: Highest acceptable predicted PSNR in dB.
        before: Deterministic transforms applied before the noise.
        reduction: ``"worst"`` (every example at or below the target) or ``"mean"``.
        damping: ``λ >= 0``.
        loss_fn: Loss with the reduction of the shared gradient.
        layers: Observed parameters.
        data_range: Input value range.
        std_low: Bisection lower end.
        std_high: Bisection upper end (error if even this is not enough).
        rel_tol: Relative width of the final bracket.
        max_iterations: Bisection step cap.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
        >>> batch = (torch.randn(2, 4), torch.tensor([0, 1]))
        >>> cal = calibrate_noise(model, batch, target_psnr=20.0)
        >>> cal.predicted_psnr <= 20.0, abs(cal.predicted_psnr - 20.0) < 0.05
        (True, True)
    """
    target_psnr = check_float("target_psnr", target_psnr)
    check_choice("reduction", reduction, ("worst", "mean"))
    damping = check_float("damping", damping, low=0.0)
    std_low = check_float("std_low", std_low, low=0.0, low_open=True)
    std_high = check_float("std_high", std_high, low=std_low, low_open=True)
    rel_tol = check_float("rel_tol", rel_tol, low=0.0, low_open=True)
    check_int("max_iterations", max_iterations, low=1)
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError(f"Expected `batch` as (inputs, targets), but got {type(batch).__name__}.")
    inputs, targets = batch[0], batch[1]
    biases, traces, dims = [], [], []
    for i in range(len(inputs)):
        op = LeakageOperator(
            model, inputs[i : i + 1], targets[i : i + 1], loss_fn=loss_fn, layers=layers
        )
        fact = GramFactorization(op.gram(), spectrum=damping > 0)
        rows = _delta_rows(op, before, list(range(len(op.names))), 1, None)
        jb = op.jvp(rows).reshape(1, -1).to(torch.float64)
        biases.append(float(fact.solve(jb, damping).norm() ** 2))
        traces.append(fact.trace_inverse(damping))
        dims.append(op.input_dim)
    bias_t = torch.tensor(biases, dtype=torch.float64)
    trace_t = torch.tensor(traces, dtype=torch.float64)

    def per_sample(std: float) -> Tensor:
        value = torch.sqrt(bias_t + std**2 * trace_t)
        return torch.stack(
            [predicted_psnr(v, d, data_range=data_range) for v, d in zip(value, dims, strict=True)]
        )

    def reduce(p: Tensor) -> float:
        return float(p.max() if reduction == "worst" else p.mean())

    if reduce(per_sample(0.0)) <= target_psnr:
        return NoiseCalibration(0.0, reduce(per_sample(0.0)), per_sample(0.0), 0)
    if reduce(per_sample(std_high)) > target_psnr:
        raise ValueError(
            f"Expected `target_psnr` to be reachable with std <= std_high={std_high}, but the "
            f"predicted PSNR there is {reduce(per_sample(std_high)):.2f} dB. Raise `std_high`."
        )
    lo, hi = std_low, std_high
    if reduce(per_sample(lo)) <= target_psnr:
        hi = lo
    steps = 0
    while hi / lo > 1.0 + rel_tol and steps < max_iterations:
        mid = math.sqrt(lo * hi)
        if reduce(per_sample(mid)) <= target_psnr:
            hi = mid
        else:
            lo = mid
        steps += 1
    final = per_sample(hi)
    return NoiseCalibration(hi, reduce(final), final, steps)
