"""Layer 3: thin Lightning callbacks. The only layer that imports ``lightning``.

Example:
    >>> import lightning_privacy.callbacks as cb
    >>> isinstance(cb.__all__, list)
    True
"""

from lightning_privacy.callbacks.dpsgd import DPSGD
from lightning_privacy.callbacks.gradient_defense import GradientDefense
from lightning_privacy.callbacks.inversion_audit import InversionAudit
from lightning_privacy.callbacks.leakage_monitor import LeakageMonitor

__all__: list[str] = [
    "DPSGD",
    "GradientDefense",
    "InversionAudit",
    "LeakageMonitor",
]
