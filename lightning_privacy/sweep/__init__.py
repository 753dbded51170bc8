"""Privacy-utility sweeps: a grid over defenses and strengths, run locally or on Ray Tune.

Example:
    >>> from lightning_privacy.sweep import parse_sweep_config
    >>> len(parse_sweep_config("defenses: [{name: none}]").trials())
    1
"""

from lightning_privacy.sweep.config import (
    STRENGTH_PARAMETERS,
    SweepConfig,
    SweepConfigError,
    TrialSpec,
    load_sweep_config,
    parse_sweep_config,
)

__all__ = [
    "STRENGTH_PARAMETERS",
    "SweepConfig",
    "SweepConfigError",
    "TrialSpec",
    "load_sweep_config",
    "parse_sweep_config",
]
