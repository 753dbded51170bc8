"""Thin wrappers over Opacus's subsampled-Gaussian accountants (RDP, PRV, GDP).

The wrappers add three things to ``opacus.accountants``: argument checks with the project's error
messages, ``step(..., steps=n)`` for several identical steps at once, and a true step count
(Opacus's ``len()`` counts history *segments*). The arithmetic is Opacus's.

Example:
    >>> acct = RDPAccountant()
    >>> acct.step(noise_multiplier=1.1, sample_rate=256 / 60000, steps=14100)
    >>> acct.steps, round(acct.get_epsilon(1e-5), 3)
    (14100, 2.6)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from opacus.accountants import IAccountant
from opacus.accountants import create_accountant as _opacus_create

from lightning_privacy._validation import check_float, check_int
from lightning_privacy.accountants.base import Accountant
from lightning_privacy.functional.accounting import check_delta


class GaussianMechanismAccountant(Accountant):
    """Base of the Opacus-backed accountants: history of ``(noise_multiplier, sample_rate, steps)``.

    Each step is assumed to be a Gaussian mechanism on a sum of per-example contributions of norm
    at most ``C`` with noise std ``noise_multiplier * C``, over a batch that contains each example
    independently with probability ``sample_rate`` (Poisson sampling; add/remove-one adjacency).

    Attributes:
        mechanism: Opacus's name of the accountant.
        opacus_accountant: The wrapped ``opacus.accountants.IAccountant`` (e.g. to attach to a
            ``DPOptimizer``).

    Example:
        >>> acct = PRVAccountant()
        >>> acct.mechanism, acct.steps
        ('prv', 0)
    """

    def __init__(self) -> None:
        with warnings.catch_warnings():
            # GDP warns on construction; the class docstring repeats the caveat.
            warnings.simplefilter("ignore", UserWarning)
            self.opacus_accountant: IAccountant = _opacus_create(mechanism=self.mechanism)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``(noise_multiplier, sample_rate, steps)`` segments, as Opacus stores them."""
        return list(self.opacus_accountant.history)

    @property
    def steps(self) -> int:
        """Total number of steps taken."""
        return sum(int(n) for _, _, n in self.opacus_accountant.history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` noisy steps with the given noise multiplier and sample rate."""
        z = check_float("noise_multiplier", noise_multiplier, low=0.0)
        q = check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
        for _ in range(check_int("steps", steps, low=0)):
            self.opacus_accountant.step(noise_multiplier=z, sample_rate=q)

    def get_epsilon(self, delta: float, **kwargs: Any) -> float:
        """ε spent so far at ``delta`` (``0.0`` before the first step), never negative.

        Opacus's conversion can go below zero for a large δ; every mechanism is ``(0, δ)``-DP
        there, so ``0.0`` is returned. Extra keyword arguments go to Opacus's ``get_epsilon``
        (e.g. ``eps_error`` for PRV).
        """
        d = check_delta(delta)
        if not self.opacus_accountant.history:
            return 0.0
        if any(z == 0.0 for z, _, _ in self.opacus_accountant.history):
            return float("inf")
        return max(0.0, float(self.opacus_accountant.get_epsilon(delta=d, **kwargs)))

    def state_dict(self) -> dict[str, Any]:
        """Opacus's state (history and mechanism name)."""
        return dict(self.opacus_accountant.state_dict())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the history; raises ``ValueError`` if the mechanism differs."""
        self.opacus_accountant.load_state_dict(dict(state_dict))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps})"


class RDPAccountant(GaussianMechanismAccountant):
    """Rényi-DP accountant (Mironov et al. 2019), Opacus's ``RDPAccountant``.

    Composes heterogeneous histories (changing sigma or q) exactly in RDP; the conversion to (ε, δ)
    is an upper bound that can be loose by ~10-20 % against PRV.

    Example:
        >>> acct = RDPAccountant()
        >>> acct.step(noise_multiplier=1.0, sample_rate=0.01, steps=100)
        >>> 0 < acct.get_epsilon(1e-5) < 2
        True
    """

    mechanism = "rdp"


class PRVAccountant(GaussianMechanismAccountant):
    """Privacy-random-variable accountant (Gopi et al. 2021), Opacus's ``PRVAccountant``.

    Numerically tight; ``get_epsilon`` returns Opacus's upper bound (``eps_error=0.01`` by
    default). Slower than RDP.

    Example:
        >>> acct = PRVAccountant()
        >>> acct.step(noise_multiplier=1.0, sample_rate=0.01, steps=100)
        >>> rdp = RDPAccountant()
        >>> rdp.step(noise_multiplier=1.0, sample_rate=0.01, steps=100)
        >>> acct.get_epsilon(1e-5) < rdp.get_epsilon(1e-5)
        True
    """

    mechanism = "prv"


class GDPAccountant(GaussianMechanismAccountant):
    """Gaussian-DP accountant (Dong et al. 2019), Opacus's ``GaussianAccountant``.

    Uses a central-limit approximation: Opacus warns that it *can underestimate* the privacy
    spent, and it raises if sigma or q change between steps. Prefer RDP or PRV for guarantees.

    Example:
        >>> acct = GDPAccountant()
        >>> acct.step(noise_multiplier=1.0, sample_rate=0.01, steps=100)
        >>> acct.get_epsilon(1e-5) > 0
        True
    """

    mechanism = "gdp"
