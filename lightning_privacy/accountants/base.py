"""The interface every privacy accountant implements.

An accountant records the releases a training run makes (noisy optimizer steps, noisy epochs) and
turns them into ε(δ). Callbacks only use this interface: ``step`` after a release, ``get_epsilon``
to log, ``epsilon_after`` to decide whether one more release fits a budget, and
``state_dict``/``load_state_dict`` so a resumed run continues its ε.

Example:
    >>> from lightning_privacy.accountants import RDPAccountant
    >>> acct = RDPAccountant()
    >>> isinstance(acct, Accountant)
    True
    >>> ahead = acct.epsilon_after(1e-5, noise_multiplier=1.0, sample_rate=0.01, steps=100)
    >>> acct.get_epsilon(1e-5), ahead > 0  # looking ahead records nothing
    (0.0, True)
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar


class Accountant(ABC):
    """Base class of accountants: releases in, ε(δ) out, checkpoint state.

    Attributes:
        mechanism: The accountant's name in the registry (``"rdp"``, ``"batch_clipping"``, ...).
    """

    mechanism: ClassVar[str] = ""

    @abstractmethod
    def step(self, *args: Any, **kwargs: Any) -> None:
        """Record releases (the arguments describe them; see each accountant)."""

    @abstractmethod
    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (``0.0`` before the first release)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the history after a restart."""

    @abstractmethod
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""

    def epsilon_after(self, delta: float, **release: Any) -> float:
        """ε at ``delta`` if ``step(**release)`` happened next; this accountant is unchanged."""
        ahead = copy.deepcopy(self)
        ahead.step(**release)
        return ahead.get_epsilon(delta)
