"""Accountants by name: ``create_accountant("rdp")``, ``list_accountants()``.

Example:
    >>> list_accountants()
    ['batch_clipping', 'gdp', 'prv', 'rdp']
    >>> create_accountant("batch_clipping", max_grad_norm=1.0, std=4.0).noise_multiplier
    2.0
    >>> create_accountant("rpd")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Unknown accountant 'rpd'. Did you mean 'rdp'? Available: ...
"""

from __future__ import annotations

from typing import Any

from lightning_privacy._registry import Registry
from lightning_privacy.accountants.base import Accountant
from lightning_privacy.accountants.batch_clipping import BatchClippingAccountant
from lightning_privacy.accountants.gaussian import GDPAccountant, PRVAccountant, RDPAccountant

ACCOUNTANTS: Registry[Accountant] = Registry("accountant")
for _accountant in (RDPAccountant, PRVAccountant, GDPAccountant, BatchClippingAccountant):
    ACCOUNTANTS.register(_accountant.mechanism)(_accountant)


def create_accountant(name: str, **kwargs: Any) -> Accountant:
    """Build the accountant registered under ``name`` with ``kwargs``.

    Example:
        >>> create_accountant("prv").mechanism
        'prv'
    """
    return ACCOUNTANTS.create(name, **kwargs)


def list_accountants() -> list[str]:
    """Registered accountant names.

    Example:
        >>> "rdp" in list_accountants()
        True
    """
    return ACCOUNTANTS.names()
