"""Privacy accountants: thin over Opacus (RDP, PRV, GDP) plus batch clipping.

Example:
    >>> from lightning_privacy.accountants import create_accountant
    >>> acct = create_accountant("rdp")
    >>> acct.step(noise_multiplier=1.0, sample_rate=0.01, steps=10)
    >>> acct.steps
    10
"""

from lightning_privacy.accountants.base import Accountant
from lightning_privacy.accountants.batch_clipping import BatchClippingAccountant
from lightning_privacy.accountants.gaussian import (
    GaussianMechanismAccountant,
    GDPAccountant,
    PRVAccountant,
    RDPAccountant,
)
from lightning_privacy.accountants.registry import (
    ACCOUNTANTS,
    create_accountant,
    list_accountants,
)

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "BatchClippingAccountant",
    "GDPAccountant",
    "GaussianMechanismAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "create_accountant",
    "list_accountants",
]
