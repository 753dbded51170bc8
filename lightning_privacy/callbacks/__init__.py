"""Layer 3: thin Lightning callbacks over the components.

With ``sweep``, ``report``, ``cli``, ``models.lit`` and ``data.datamodules`` these are the modules
that import ``lightning`` (see ``docs/ARCHITECTURE.md``).

Example:
    >>> import lightning_privacy.callbacks as cb
    >>> cb.__all__  # doctest: +NORMALIZE_WHITESPACE
    ['DPSGD', 'CanaryAudit', 'GradientDefense', 'InversionAudit', 'LeakageMonitor',
     'MembershipAudit']
"""

from lightning_privacy.callbacks.canary_audit import CanaryAudit
from lightning_privacy.callbacks.dpsgd import DPSGD
from lightning_privacy.callbacks.gradient_defense import GradientDefense
from lightning_privacy.callbacks.inversion_audit import InversionAudit
from lightning_privacy.callbacks.leakage_monitor import LeakageMonitor
from lightning_privacy.callbacks.membership_audit import MembershipAudit

__all__: list[str] = [
    "DPSGD",
    "CanaryAudit",
    "GradientDefense",
    "InversionAudit",
    "LeakageMonitor",
    "MembershipAudit",
]
