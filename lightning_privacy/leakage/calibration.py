"""Noise chosen by leakage: the smallest Gaussian ``std`` whose predicted attack PSNR is low enough.

For ``[*before, GaussianNoise(std)]`` the expected squared I2F of each example is
``‖(J Jᵀ + λ I)⁻¹ J b‖² + std² Σ λ_i / (λ_i + λ)²`` (``b``: the residual of the deterministic
``before``), so one factorisation of ``J Jᵀ`` per example gives the predicted PSNR at every
``std``; :func:`calibrate_noise` bisects on ``log std``.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> cal = calibrate_noise(model, (torch.randn(1, 4), torch.tensor([1])), target_psnr=30.0)
    >>> cal.std > 0, cal.predicted_psnr <= 30.0
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_privacy._validation import check_choice, check_float, check_int
from lightning_privacy.defenses.base import GradientTransform
from lightning_privacy.functional.gradients import LossFn
from lightning_privacy.functional.leakage import LeakageOperator, predicted_psnr
from lightning_privacy.functional.precision import full_precision
from lightning_privacy.leakage.base import EstimationContext


@dataclass(frozen=True)
class NoiseCalibration:
    """Result of :func:`calibrate_noise`.

    Attributes:
        std: The smallest Gaussian ``std`` (to the bisection tolerance) whose predicted PSNR is at
            most the target.
        predicted_psnr: The predicted PSNR at ``std`` (after ``reduction``).
        per_sample_predicted_psnr: ``(B,)`` predicted PSNR per example at ``std``.
        iterations: Bisection steps.

    Example:
        >>> NoiseCalibration(0.0, 12.5, torch.tensor([12.5]), 0).iterations
        0
    """

    std: float
    predicted_psnr: float
    per_sample_predicted_psnr: Tensor
    iterations: int


@dataclass(frozen=True)
class _PredictedPSNRCurve:
    """Predicted PSNR per example as a function of ``std``, from two numbers per example."""

    bias_i2f_sq: Tensor  # ‖(J Jᵀ + λ I)⁻¹ J b‖²
    trace_inverse: Tensor  # Σ λ_i / (λ_i + λ)²
    input_dims: tuple[int, ...]
    data_range: float
    reduction: str

    def per_sample(self, std: float) -> Tensor:
        value = torch.sqrt(self.bias_i2f_sq + std**2 * self.trace_inverse)
        return torch.stack(
            [
                predicted_psnr(v, d, data_range=self.data_range)
                for v, d in zip(value, self.input_dims, strict=True)
            ]
        )

    def reduce(self, psnr: Tensor) -> float:
        return float(psnr.max() if self.reduction == "worst" else psnr.mean())

    def reduced(self, std: float) -> float:
        return self.reduce(self.per_sample(std))


def _measure_curve(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    context: EstimationContext,
    *,
    loss_fn: LossFn,
    layers: str | Sequence[str] | None,
    reduction: str,
) -> _PredictedPSNRCurve:
    """Factorise ``J Jᵀ`` of every example once and keep the two terms of its expected I2F."""
    bias_i2f_sq, traces, dims = [], [], []
    for i in range(len(inputs)):
        op = LeakageOperator(
            model, inputs[i : i + 1], targets[i : i + 1], loss_fn=loss_fn, layers=layers
        )
        solver = context.gram_solver(op)
        jbias = op.jdelta_rows(context.draw_deltas(op, num_draws=1))
        bias_i2f_sq.append(float(solver.solve_norms(jbias)[0] ** 2))
        traces.append(solver.trace_inverse())
        dims.append(op.input_dim)
    return _PredictedPSNRCurve(
        torch.tensor(bias_i2f_sq, dtype=torch.float64),
        torch.tensor(traces, dtype=torch.float64),
        tuple(dims),
        context.data_range,
        reduction,
    )


def _bisect_std(
    curve: _PredictedPSNRCurve,
    target_psnr: float,
    *,
    std_low: float,
    std_high: float,
    rel_tol: float,
    max_iterations: int,
) -> NoiseCalibration:
    """Bisection on ``log std`` for the smallest ``std`` with ``curve.reduced(std) <= target``."""
    clean = curve.per_sample(0.0)
    if curve.reduce(clean) <= target_psnr:
        return NoiseCalibration(0.0, curve.reduce(clean), clean, 0)
    if curve.reduced(std_high) > target_psnr:
        raise ValueError(
            f"Expected `target_psnr` to be reachable with std <= std_high={std_high}, but the "
            f"predicted PSNR there is {curve.reduced(std_high):.2f} dB. Raise `std_high`."
        )
    lo, hi = std_low, std_high
    if curve.reduced(lo) <= target_psnr:
        hi = lo
    steps = 0
    while hi / lo > 1.0 + rel_tol and steps < max_iterations:
        mid = math.sqrt(lo * hi)
        if curve.reduced(mid) <= target_psnr:
            hi = mid
        else:
            lo = mid
        steps += 1
    final = curve.per_sample(hi)
    return NoiseCalibration(hi, curve.reduce(final), final, steps)


@full_precision()
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
    context = EstimationContext(
        transforms=tuple(before), damping=damping, method="dense", data_range=data_range
    )
    curve = _measure_curve(
        model, batch[0], batch[1], context, loss_fn=loss_fn, layers=layers, reduction=reduction
    )
    return _bisect_std(
        curve,
        target_psnr,
        std_low=std_low,
        std_high=std_high,
        rel_tol=rel_tol,
        max_iterations=max_iterations,
    )
