"""Gradient-inversion attacks as pure functions (no Lightning, no global RNG).

Example:
    >>> from lightning_privacy.functional.attacks import deep_leakage, Reconstruction
    >>> callable(deep_leakage)
    True
"""

from lightning_privacy.functional.attacks.analytic import analytic_linear, token_leakage
from lightning_privacy.functional.attacks.common import (
    GradientMatcher,
    Reconstruction,
    observed_gradients_of,
    resolve_gradients,
    restore_labels,
    total_variation,
)
from lightning_privacy.functional.attacks.dlg import deep_leakage
from lightning_privacy.functional.attacks.inverting import inverting_gradients
from lightning_privacy.functional.attacks.patch_embedding import analytic_patch_embedding

__all__ = [
    "GradientMatcher",
    "Reconstruction",
    "analytic_linear",
    "analytic_patch_embedding",
    "deep_leakage",
    "inverting_gradients",
    "observed_gradients_of",
    "resolve_gradients",
    "restore_labels",
    "token_leakage",
    "total_variation",
]
