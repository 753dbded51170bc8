"""The registered membership attacks.

Threshold attacks (no reference models; each scores one example from the target's output alone):

* ``loss`` -- :class:`LossAttack`, Yeom et al. (2018): minus the training loss;
* ``confidence`` -- :class:`ConfidenceAttack`: the true-class probability;
* ``entropy`` -- :class:`EntropyAttack`: minus the prediction's entropy;
* ``modified_entropy`` -- :class:`ModifiedEntropyAttack`, Song and Mittal (2021).

Attacks with reference models (models of the same architecture trained on data like the
target's; offline: only the ones that did not train on an example are used for it):

* ``lira_offline`` -- :class:`LiRAOffline`, Carlini et al. (2022);
* ``rmia`` -- :class:`RMIA`, Zarifzadeh et al. (2024), which also compares against population
  samples nobody trained on.

Both take ``reference_models=`` (modules trained without the audited examples) when used inside
``MembershipAudit``; ``lightning-privacy audit membership`` trains and caches them itself and
passes their outputs in the :class:`~lightning_privacy.membership.MembershipQuery`.

Example:
    >>> import torch
    >>> query = MembershipQuery(torch.tensor([[3.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    >>> [round(float(MEMBERSHIP_ATTACKS.create(n).score(query)[0]), 3)
    ...  for n in ("loss", "confidence", "entropy", "modified_entropy")]
    [-0.049, 0.953, -0.191, -0.005]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from lightning_privacy._validation import check_bool, check_float
from lightning_privacy.functional import membership as F
from lightning_privacy.membership.base import (
    MEMBERSHIP_ATTACKS,
    MembershipAttack,
    MembershipQuery,
)

__all__ = [
    "RMIA",
    "ConfidenceAttack",
    "EntropyAttack",
    "LiRAOffline",
    "LossAttack",
    "ModifiedEntropyAttack",
    "ReferenceModelAttack",
]


@MEMBERSHIP_ATTACKS.register("loss")
@dataclass(frozen=True)
class LossAttack(MembershipAttack):
    """Yeom et al. (2018): a member's training loss is low; score = minus the loss.

    The loss is the query's ``loss_fn`` (the module's training loss, per example), else
    cross-entropy.

    Example:
        >>> import torch
        >>> LossAttack().score(MembershipQuery(torch.tensor([[0.0, 0.0]]), torch.tensor([1])))
        tensor([-0.6931], dtype=torch.float64)
    """

    def score(self, query: MembershipQuery) -> Tensor:
        """Minus each example's loss."""
        return F.loss_scores(query.logits, query.targets, loss_fn=query.loss_fn)


@MEMBERSHIP_ATTACKS.register("confidence")
@dataclass(frozen=True)
class ConfidenceAttack(MembershipAttack):
    """The model is more confident on its training data; score = true-class probability.

    Example:
        >>> import torch
        >>> ConfidenceAttack().score(MembershipQuery(torch.zeros(1, 4), torch.tensor([2])))
        tensor([0.2500], dtype=torch.float64)
    """

    def score(self, query: MembershipQuery) -> Tensor:
        """The probability of the true class."""
        return F.confidence_scores(query.logits, query.targets)


@MEMBERSHIP_ATTACKS.register("entropy")
@dataclass(frozen=True)
class EntropyAttack(MembershipAttack):
    """Predictions on members have low entropy; score = minus the entropy (labels unused).

    Example:
        >>> import torch
        >>> EntropyAttack().score(MembershipQuery(torch.zeros(1, 4), torch.tensor([2])))
        tensor([-1.3863], dtype=torch.float64)
    """

    def score(self, query: MembershipQuery) -> Tensor:
        """Minus the entropy of the softmax output."""
        return F.entropy_scores(query.logits)


@MEMBERSHIP_ATTACKS.register("modified_entropy")
@dataclass(frozen=True)
class ModifiedEntropyAttack(MembershipAttack):
    """Song and Mittal (2021): an entropy that is high for confident *wrong* predictions.

    Example:
        >>> import torch
        >>> query = MembershipQuery(torch.tensor([[5.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 0]))
        >>> ModifiedEntropyAttack().score(query).round(decimals=3)
        tensor([-0.0000, -9.9460], dtype=torch.float64)
    """

    def score(self, query: MembershipQuery) -> Tensor:
        """Minus the modified entropy."""
        return F.modified_entropy_scores(query.logits, query.targets)


@dataclass(frozen=True)
class ReferenceModelAttack(MembershipAttack):
    """What the attacks with reference models share: the reference models for a callback.

    Args:
        reference_models: Modules trained like the target but without the audited examples,
            for ``MembershipAudit`` (which computes their outputs once, before training). Not
            needed when the query already holds ``reference_logits`` (the command line).
    """

    needs_reference: ClassVar[bool] = True
    reference_models: tuple[nn.Module, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        models = self.reference_models
        if isinstance(models, nn.Module) or not isinstance(models, Sequence):
            raise TypeError(
                "Expected `reference_models` to be a sequence of nn.Module, but got "
                f"{type(models).__name__}."
            )
        bad = [type(m).__name__ for m in models if not isinstance(m, nn.Module)]
        if bad:
            raise TypeError(
                f"Expected `reference_models` to hold nn.Module instances, but got {bad}."
            )
        object.__setattr__(self, "reference_models", tuple(models))


@MEMBERSHIP_ATTACKS.register("lira_offline")
@dataclass(frozen=True)
class LiRAOffline(ReferenceModelAttack):
    """Offline LiRA (Carlini et al. 2022): the target's confidence against the OUT models' fit.

    Args:
        fixed_variance: One Gaussian width for all examples (the paper's choice below 64
            reference models).
        reference_models: See :class:`ReferenceModelAttack`.

    Example:
        >>> import torch
        >>> refs = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[2.0, 0.0]]])
        >>> query = MembershipQuery(torch.tensor([[3.0, 0.0]]), torch.tensor([0]),
        ...                         reference_logits=refs)
        >>> LiRAOffline().score(query)
        tensor([2.], dtype=torch.float64)
    """

    fixed_variance: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("fixed_variance", self.fixed_variance)

    def score(self, query: MembershipQuery) -> Tensor:
        """The z-score of the target's logit confidence under the OUT Gaussian."""
        self._require(query)
        assert query.reference_logits is not None
        return F.lira_offline_scores(
            query.logits,
            query.targets,
            query.reference_logits,
            out_mask=query.out_mask,
            fixed_variance=self.fixed_variance,
        )


@MEMBERSHIP_ATTACKS.register("rmia")
@dataclass(frozen=True)
class RMIA(ReferenceModelAttack):
    """RMIA (Zarifzadeh et al. 2024), offline: pairwise likelihood ratios against population z.

    Args:
        offline_a: The offline correction of ``Pr(x)`` from OUT models only.
        gamma: Likelihood-ratio threshold.
        reference_models: See :class:`ReferenceModelAttack`.
        population: Population samples nobody trained on (a batch the adapter unpacks, e.g.
            ``(inputs, targets)``), for ``MembershipAudit``.

    Example:
        >>> import torch
        >>> query = MembershipQuery(
        ...     torch.tensor([[3.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 0]),
        ...     reference_logits=torch.zeros(2, 2, 2),
        ...     population_logits=torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]]),
        ...     population_targets=torch.tensor([0, 0, 0]),
        ...     population_reference_logits=torch.zeros(2, 3, 2))
        >>> RMIA().score(query)
        tensor([1.0000, 0.6667], dtype=torch.float64)
    """

    needs_population: ClassVar[bool] = True
    offline_a: float = 0.3
    gamma: float = 1.0
    population: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("offline_a", self.offline_a, low=0.0, high=1.0)
        check_float("gamma", self.gamma, low=0.0, low_open=True)

    def score(self, query: MembershipQuery) -> Tensor:
        """The share of population samples each example's likelihood ratio beats."""
        self._require(query)
        assert query.reference_logits is not None and query.population_logits is not None
        assert query.population_targets is not None
        assert query.population_reference_logits is not None
        return F.rmia_scores(
            query.logits,
            query.targets,
            query.reference_logits,
            query.population_logits,
            query.population_targets,
            query.population_reference_logits,
            out_mask=query.out_mask,
            offline_a=self.offline_a,
            gamma=self.gamma,
        )
