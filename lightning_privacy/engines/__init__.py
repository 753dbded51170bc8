"""Engines: components that make a training run private as a whole (no Lightning import).

:class:`DPSGDEngine` is Opacus's DP-SGD in named phases (validate, resolve, make private,
release); the ``DPSGD`` callback wires it into a Trainer.

Example:
    >>> from lightning_privacy.engines import DPSGDEngine
    >>> DPSGDEngine(max_grad_norm=1.0, target_epsilon=3.0).target_epsilon
    3.0
"""

from lightning_privacy.engines.dpsgd import (
    ACCOUNTANTS,
    GRAD_SAMPLE_MODES,
    DPSGDEngine,
    DPSGDPlan,
    steps_per_epoch,
)
from lightning_privacy.engines.opacus_layers import find_unsupported_layers, fix_unsupported_layers

__all__ = [
    "ACCOUNTANTS",
    "GRAD_SAMPLE_MODES",
    "DPSGDEngine",
    "DPSGDPlan",
    "find_unsupported_layers",
    "fix_unsupported_layers",
    "steps_per_epoch",
]
