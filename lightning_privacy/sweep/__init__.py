"""Privacy-utility sweeps: a grid over defenses and strengths, run locally or on Ray Tune.

Example:
    >>> from lightning_privacy.sweep import parse_sweep_config
    >>> len(parse_sweep_config("defenses: [{name: none}]").trials())
    1
    >>> STRENGTH_PARAMETERS["gaussian_noise"], STRENGTH_PARAMETERS["dpsgd"]
    ('std', 'noise_multiplier')
"""

from lightning_privacy.sweep.config import (
    STRENGTH_PARAMETERS,
    SweepConfig,
    SweepConfigError,
    TrialSpec,
    load_sweep_config,
    parse_sweep_config,
)
from lightning_privacy.sweep.results import NO_FORMAL_DP, TrialResult, load_results

__all__ = [
    "NO_FORMAL_DP",
    "STRENGTH_PARAMETERS",
    "SweepConfig",
    "SweepConfigError",
    "TrialResult",
    "TrialSpec",
    "load_results",
    "load_sweep_config",
    "parse_sweep_config",
]
