"""Engines: components that make a training run private as a whole (no Lightning import).

:class:`DPSGDEngine` is Opacus's DP-SGD in named phases (validate, rehearse, resolve, make private,
release); the ``DPSGD`` callback wires it into a Trainer. :mod:`~lightning_privacy.engines.inplace`
finds the in-place writes Opacus's hooks forbid, :mod:`~lightning_privacy.engines.opacus_layers` the
layers Opacus cannot train.

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
from lightning_privacy.engines.inplace import (
    InplaceWrite,
    find_inplace_writes,
    inplace_report,
    turn_off_inplace,
)
from lightning_privacy.engines.opacus_layers import (
    LayerProblem,
    find_unsupported_layers,
    fix_unsupported_layers,
    group_layer_problems,
    layer_problems,
)

__all__ = [
    "ACCOUNTANTS",
    "GRAD_SAMPLE_MODES",
    "DPSGDEngine",
    "DPSGDPlan",
    "InplaceWrite",
    "LayerProblem",
    "find_inplace_writes",
    "find_unsupported_layers",
    "fix_unsupported_layers",
    "group_layer_problems",
    "inplace_report",
    "layer_problems",
    "steps_per_epoch",
    "turn_off_inplace",
]
