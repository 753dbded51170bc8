"""The interface of membership-inference attacks and their registry (``MEMBERSHIP_ATTACKS``).

A membership attack is a frozen dataclass holding its hyperparameters, with one method,
``score(query) -> Tensor``: one score per queried example, higher meaning "more likely a training
member". A :class:`MembershipQuery` carries what the attacker observes: the target model's logits
and the labels, and for attacks with reference models (``needs_reference``) the reference
models' logits on the same examples (and on population samples, for RMIA). The work is done by
the pure functions of :mod:`lightning_privacy.functional.membership`.

This registry is separate from the gradient-inversion attacks' (``lightning_privacy.attacks``):
the two kinds take different inputs and answer different questions.

Example:
    >>> import torch
    >>> from lightning_privacy.membership import create_membership_attack
    >>> query = MembershipQuery(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
    >>> create_membership_attack("confidence").score(query).round(decimals=3)
    tensor([0.8810, 0.1190], dtype=torch.float64)
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from lightning_privacy._registry import Registry

__all__ = [
    "MEMBERSHIP_ATTACKS",
    "MembershipAttack",
    "MembershipQuery",
    "create_membership_attack",
    "list_membership_attacks",
]


@dataclass(frozen=True)
class MembershipQuery:
    """What a membership attacker observes about the queried examples.

    Args:
        logits: ``(N, classes)`` outputs of the target model.
        targets: ``(N,)`` class ids.
        loss_fn: The training loss ``loss_fn(outputs, targets) -> scalar`` (the ``loss`` attack
            applies it to one example at a time); ``None``: cross-entropy.
        reference_logits: ``(K, N, classes)`` outputs of K reference models on the same examples.
        out_mask: ``(K, N)`` bool, True where reference model k did not train on example n;
            ``None``: no reference model trained on any queried example.
        population_logits: ``(M, classes)`` target outputs on population samples nobody trained
            on (RMIA).
        population_targets: ``(M,)`` their class ids.
        population_reference_logits: ``(K, M, classes)`` reference outputs on them.

    Example:
        >>> import torch
        >>> MembershipQuery(torch.zeros(3, 2), torch.zeros(3)).num_examples
        3
    """

    logits: Tensor
    targets: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    reference_logits: Tensor | None = None
    out_mask: Tensor | None = None
    population_logits: Tensor | None = None
    population_targets: Tensor | None = None
    population_reference_logits: Tensor | None = None

    @property
    def num_examples(self) -> int:
        """How many examples are queried."""
        return len(self.logits)

    @property
    def num_reference_models(self) -> int:
        """K, the number of reference models (0 without)."""
        return 0 if self.reference_logits is None else int(self.reference_logits.shape[0])


MEMBERSHIP_ATTACKS: Registry[MembershipAttack] = Registry("membership attack")


class MembershipAttack(ABC):
    """Base class of membership attacks (frozen dataclasses; fields: the hyperparameters).

    Attributes:
        needs_reference: Whether the attack needs reference models' outputs.
        needs_population: Whether it also needs population samples (RMIA).

    Example:
        >>> from lightning_privacy.membership import LiRAOffline, LossAttack
        >>> LossAttack.needs_reference, LiRAOffline.needs_reference
        (False, True)
    """

    needs_reference: ClassVar[bool] = False
    needs_population: ClassVar[bool] = False

    @abstractmethod
    def score(self, query: MembershipQuery) -> Tensor:
        """One score per queried example (float64), higher meaning "more likely a member"."""

    def options(self) -> dict[str, Any]:
        """The hyperparameters (the dataclass fields that compare, i.e. not reference models)."""
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return {f.name: getattr(self, f.name) for f in fields if f.compare}

    def missing(self, query: MembershipQuery) -> list[str]:
        """What ``query`` lacks for this attack (empty: it can score)."""
        name = type(self).__name__
        problems = []
        if self.needs_reference and query.reference_logits is None:
            problems.append(f"{name} needs the outputs of reference models (reference_logits)")
        if self.needs_population and (
            query.population_logits is None
            or query.population_targets is None
            or query.population_reference_logits is None
        ):
            problems.append(
                f"{name} needs population samples: population_logits, population_targets and "
                "population_reference_logits"
            )
        return problems

    def _require(self, query: MembershipQuery) -> None:
        problems = self.missing(query)
        if problems:
            raise ValueError("; ".join(problems) + ".")


def create_membership_attack(name: str, **kwargs: Any) -> MembershipAttack:
    """Build the membership attack registered under ``name`` with ``kwargs``.

    Example:
        >>> create_membership_attack("lira_offline", fixed_variance=False).fixed_variance
        False
        >>> try:
        ...     create_membership_attack("los")
        ... except ValueError as err:
        ...     print(str(err).split(" Available")[0])
        Unknown membership attack 'los'. Did you mean 'loss'?
    """
    return MEMBERSHIP_ATTACKS.create(name, **kwargs)


def list_membership_attacks() -> list[str]:
    """Names of the registered membership attacks.

    Example:
        >>> list_membership_attacks()
        ['confidence', 'entropy', 'lira_offline', 'loss', 'modified_entropy', 'rmia']
    """
    return MEMBERSHIP_ATTACKS.names()
