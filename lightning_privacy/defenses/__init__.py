"""Gradient defenses: configured transforms selectable by name.

Example:
    >>> from lightning_privacy.defenses import GradientTransform, create_defense
    >>> GradientTransform.provides_formal_dp
    False
    >>> create_defense("magnitude_pruning", ratio=0.9)
    MagnitudePruning(ratio=0.9, scope='per_tensor')
"""

from lightning_privacy.defenses.base import (
    AdditiveNoise,
    DPRole,
    FormalMechanism,
    GradientTransform,
    apply_transforms,
    draw_noise,
    formal_mechanism,
)
from lightning_privacy.defenses.transforms import (
    DEFENSES,
    GaussianNoise,
    GradientClipping,
    LaplaceNoise,
    LowRankFiltering,
    MagnitudePruning,
    RandomPruning,
    create_defense,
    list_defenses,
)

__all__ = [
    "DEFENSES",
    "AdditiveNoise",
    "DPRole",
    "FormalMechanism",
    "GaussianNoise",
    "GradientClipping",
    "GradientTransform",
    "LaplaceNoise",
    "LowRankFiltering",
    "MagnitudePruning",
    "RandomPruning",
    "apply_transforms",
    "create_defense",
    "draw_noise",
    "formal_mechanism",
    "list_defenses",
]
