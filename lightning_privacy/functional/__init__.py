"""Layer 1: pure functions on tensors and modules. No Lightning import, no hidden state.

Every sampling function takes ``generator: torch.Generator | None``. ``tests/test_layering.py``
checks, on the import graph and in a fresh interpreter, that nothing here imports Lightning.

Example:
    >>> import torch
    >>> from lightning_privacy.functional import clip_by_global_norm
    >>> clip_by_global_norm([torch.tensor([3.0, 4.0])], max_norm=1.0)
    [tensor([0.6000, 0.8000])]
"""

from lightning_privacy.functional.accounting import (
    batch_clipping_epsilon,
    batch_clipping_noise_multiplier,
    dpsgd_epsilon,
    dpsgd_noise_multiplier,
)
from lightning_privacy.functional.attacks import Reconstruction, deep_leakage, restore_labels
from lightning_privacy.functional.defenses import (
    clip_by_global_norm,
    gaussian_noise,
    global_norm,
    laplace_noise,
    low_rank,
    magnitude_pruning,
    random_pruning,
)
from lightning_privacy.functional.gradients import parameter_gradients, select_parameters
from lightning_privacy.functional.leakage import (
    LeakageOperator,
    expected_gaussian_i2f,
    i2f,
    i2f_lower_bound,
    predicted_psnr,
)

__all__ = [
    "LeakageOperator",
    "Reconstruction",
    "batch_clipping_epsilon",
    "batch_clipping_noise_multiplier",
    "clip_by_global_norm",
    "deep_leakage",
    "dpsgd_epsilon",
    "dpsgd_noise_multiplier",
    "expected_gaussian_i2f",
    "gaussian_noise",
    "global_norm",
    "i2f",
    "i2f_lower_bound",
    "laplace_noise",
    "low_rank",
    "magnitude_pruning",
    "parameter_gradients",
    "predicted_psnr",
    "random_pruning",
    "restore_labels",
    "select_parameters",
]
