"""Membership-inference attacks as registered components (the ``MEMBERSHIP_ATTACKS`` registry).

Layer 2: plain torch, no Lightning. ``MembershipAudit`` and ``CanaryAudit``
(:mod:`lightning_privacy.callbacks`) and ``lightning-privacy audit membership`` use these; the
metrics and ε bounds are in :mod:`lightning_privacy.functional.membership`.

Example:
    >>> from lightning_privacy.membership import create_membership_attack, list_membership_attacks
    >>> type(create_membership_attack("modified_entropy")).__name__
    'ModifiedEntropyAttack'
    >>> [n for n in list_membership_attacks() if MEMBERSHIP_ATTACKS.get(n).needs_reference]
    ['lira_offline', 'rmia']
"""

from lightning_privacy.membership.attacks import (
    RMIA,
    ConfidenceAttack,
    EntropyAttack,
    LiRAOffline,
    LossAttack,
    ModifiedEntropyAttack,
    ReferenceModelAttack,
)
from lightning_privacy.membership.base import (
    MEMBERSHIP_ATTACKS,
    MembershipAttack,
    MembershipQuery,
    create_membership_attack,
    list_membership_attacks,
)

__all__ = [
    "MEMBERSHIP_ATTACKS",
    "RMIA",
    "ConfidenceAttack",
    "EntropyAttack",
    "LiRAOffline",
    "LossAttack",
    "MembershipAttack",
    "MembershipQuery",
    "ModifiedEntropyAttack",
    "ReferenceModelAttack",
    "create_membership_attack",
    "list_membership_attacks",
]
