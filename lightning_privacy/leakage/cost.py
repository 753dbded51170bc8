"""What one I²F measurement will cost on this model and input, before running it.

``LeakageMonitor`` calls :func:`estimate_cost` once before training: it builds the operator of
one held-out example, times a batch of ``Jᵀ v`` products on it, and multiplies by the products the
estimator needs (:meth:`~lightning_privacy.leakage.LeakageEstimator.products`). A measurement that
would not fit its time bound is refused with the fix instead of running for minutes.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> cost = estimate_cost(model, torch.randn(2, 4), torch.tensor([0, 1]), estimator="exact")
    >>> cost.products, cost.seconds(2) < 10.0
    (8, True)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from lightning_privacy.functional.gradients import LossFn
from lightning_privacy.functional.leakage import LeakageOperator
from lightning_privacy.leakage.base import ESTIMATORS, EstimationContext

__all__ = ["CostEstimate", "estimate_cost"]

#: Products timed to estimate the cost of one (a batch amortises vmap's per-call overhead).
TIMED_PRODUCTS = 8


@dataclass(frozen=True)
class CostEstimate:
    """The predicted wall time of an I²F measurement.

    Attributes:
        setup_seconds: Building one example's operator (two gradient graphs).
        seconds_per_product: One ``Jᵀ v`` product, batched as the estimators batch them.
        products: Products one example needs with the chosen estimator and method.
        input_dim: ``d_x`` of one example.

    Example:
        >>> CostEstimate(0.5, 0.01, 100, 64).seconds(4)
        6.0
    """

    setup_seconds: float
    seconds_per_product: float
    products: int
    input_dim: int

    @property
    def seconds_per_example(self) -> float:
        """Predicted seconds for one example."""
        return self.setup_seconds + self.products * self.seconds_per_product

    def seconds(self, num_examples: int) -> float:
        """Predicted seconds for ``num_examples`` examples."""
        return num_examples * self.seconds_per_example


def estimate_cost(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    estimator: str = "exact",
    loss_fn: LossFn = F.cross_entropy,
    layers: str | Sequence[str] | None = None,
    num_delta_samples: int = 4,
    method: str = "auto",
    dense_limit: int = 4096,
) -> CostEstimate:
    """Time one example's operator and a few products; predict one measurement's cost.

    Args:
        model: The network (as for :func:`~lightning_privacy.leakage.estimate_leakage`).
        inputs: Held-out examples; the first one is timed.
        targets: Their targets.
        estimator: A name in :data:`~lightning_privacy.leakage.ESTIMATORS`.
        loss_fn: The loss of the shared gradient.
        layers: Observed parameters.
        num_delta_samples: δ draws per example.
        method: ``"auto"``, ``"dense"`` or ``"cg"``.
        dense_limit: Largest input dimension of the dense path under ``"auto"``.

    Returns:
        A :class:`CostEstimate`.
    """
    start = time.perf_counter()
    op = LeakageOperator(model, inputs[:1], targets[:1], loss_fn=loss_fn, layers=layers)
    setup = time.perf_counter() - start
    count = min(TIMED_PRODUCTS, op.input_dim)
    probes = torch.eye(op.input_dim, dtype=op.dtype, device=op.gradient.device)[:count]
    start = time.perf_counter()
    vmap(op.jt)(probes)
    per_product = (time.perf_counter() - start) / count
    context = EstimationContext(
        num_delta_samples=num_delta_samples, method=method, dense_limit=dense_limit
    )
    products = ESTIMATORS.create(estimator).products(op.input_dim, context)
    return CostEstimate(setup, per_product, products, op.input_dim)
