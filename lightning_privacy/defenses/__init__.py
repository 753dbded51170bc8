"""Gradient defenses: configured transforms selectable by name.

Example:
    >>> from lightning_privacy.defenses import GradientTransform
    >>> GradientTransform.provides_formal_dp
    False
"""

from lightning_privacy.defenses.base import GradientTransform, apply_transforms

__all__ = ["GradientTransform", "apply_transforms"]
