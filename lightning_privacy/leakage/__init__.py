"""I2F leakage estimates (Zhang et al., NeurIPS 2023): how well a perfect attacker inverts.

Layer 2 over :mod:`lightning_privacy.functional.leakage`: δ from any defense pipeline, per-sample
and per-class estimates by registered estimators (:data:`ESTIMATORS`: ``base`` holds their
interface, ``estimators`` the built-in ones and :func:`estimate_leakage`), the Gaussian expectation
and noise calibration by predicted PSNR (``calibration``).

Example:
    >>> import torch
    >>> from lightning_privacy.leakage import i2f, i2f_lower_bound
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> delta = [1e-3 * torch.ones_like(p) for p in model.parameters()]
    >>> x, y = torch.randn(1, 3), torch.tensor([0])
    >>> bool(i2f_lower_bound(model, x, y, delta).value <= i2f(model, x, y, delta).value)
    True
"""

from lightning_privacy.functional.leakage import (
    GramFactorization,
    GramSolver,
    I2FResult,
    LeakageOperator,
    LowerBoundResult,
    expected_gaussian_i2f,
    i2f,
    i2f_lower_bound,
    predicted_psnr,
)
from lightning_privacy.leakage.base import (
    ESTIMATORS,
    VALIDATED_RELATIVE_PERTURBATION,
    EstimationContext,
    LeakageEstimate,
    LeakageEstimator,
    ProductCount,
    SampleEstimate,
    create_estimator,
    defense_delta,
    list_estimators,
    mean_square_norm,
)
from lightning_privacy.leakage.calibration import NoiseCalibration, calibrate_noise
from lightning_privacy.leakage.cost import CostEstimate, estimate_cost
from lightning_privacy.leakage.estimators import (
    ApproximateI2F,
    ExactI2F,
    ExpectedI2F,
    LowerBound,
    estimate_leakage,
    split_gaussian_pipeline,
)

__all__ = [
    "ESTIMATORS",
    "VALIDATED_RELATIVE_PERTURBATION",
    "ApproximateI2F",
    "CostEstimate",
    "EstimationContext",
    "ExactI2F",
    "ExpectedI2F",
    "GramFactorization",
    "GramSolver",
    "I2FResult",
    "LeakageEstimate",
    "LeakageEstimator",
    "LeakageOperator",
    "LowerBound",
    "LowerBoundResult",
    "NoiseCalibration",
    "ProductCount",
    "SampleEstimate",
    "calibrate_noise",
    "create_estimator",
    "defense_delta",
    "estimate_cost",
    "estimate_leakage",
    "expected_gaussian_i2f",
    "i2f",
    "i2f_lower_bound",
    "list_estimators",
    "mean_square_norm",
    "predicted_psnr",
    "split_gaussian_pipeline",
]
