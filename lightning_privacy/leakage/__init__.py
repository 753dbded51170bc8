"""I2F leakage estimates (Zhang et al., NeurIPS 2023): how well a perfect attacker inverts.

Layer 2 over :mod:`lightning_privacy.functional.leakage`: δ from any defense pipeline, per-sample
and per-class estimates, the Gaussian expectation and noise calibration by predicted PSNR.

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
    I2FResult,
    LeakageOperator,
    LowerBoundResult,
    expected_gaussian_i2f,
    i2f,
    i2f_lower_bound,
    predicted_psnr,
)
from lightning_privacy.leakage.estimators import (
    ESTIMATORS,
    VALIDATED_RELATIVE_PERTURBATION,
    LeakageEstimate,
    NoiseCalibration,
    calibrate_noise,
    defense_delta,
    estimate_leakage,
    split_gaussian_pipeline,
)

__all__ = [
    "ESTIMATORS",
    "VALIDATED_RELATIVE_PERTURBATION",
    "GramFactorization",
    "I2FResult",
    "LeakageEstimate",
    "LeakageOperator",
    "LowerBoundResult",
    "NoiseCalibration",
    "calibrate_noise",
    "defense_delta",
    "estimate_leakage",
    "expected_gaussian_i2f",
    "i2f",
    "i2f_lower_bound",
    "predicted_psnr",
    "split_gaussian_pipeline",
]
