"""What one I²F measurement will cost on this model and input, before running it.

``LeakageMonitor`` calls :func:`estimate_cost` once before training: it builds the operator of
one held-out example (and its batched products), times each kind of product the estimator needs
(:meth:`~lightning_privacy.leakage.LeakageEstimator.products`: columns in full batches, products
batched over the δ draws, single products, the preconditioner's columns) and adds them up. A
measurement that would not fit its time bound is refused with the fix instead of running for
minutes.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> cost = estimate_cost(model, torch.randn(2, 4), torch.tensor([0, 1]), estimator="exact")
    >>> cost.products, cost.seconds(2) < 10.0
    (8, True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_privacy.functional.gradients import LossFn
from lightning_privacy.functional.leakage import LeakageOperator, chosen_stem
from lightning_privacy.functional.precision import full_precision
from lightning_privacy.leakage.base import ESTIMATORS, EstimationContext, ProductCount

__all__ = ["CostEstimate", "estimate_cost"]

#: Single products timed (their median is kept).
TIMED_PRODUCTS = 3


@dataclass(frozen=True)
class CostEstimate:
    """The predicted wall time of an I²F measurement.

    Attributes:
        setup_seconds: Building one example's operator and its batched products.
        seconds_per_product: One single ``J Jᵀ v`` product (Lanczos, plain CG, ``J δ``).
        counts: Products one example needs, by kind (see
            :class:`~lightning_privacy.leakage.ProductCount`).
        input_dim: ``d_x`` of one example.
        seconds_per_kind: Seconds per product of each kind that was timed (``"columns"``,
            ``"solves"``, ``"prefix"``; ``"single"`` is :attr:`seconds_per_product`).

    Example:
        >>> CostEstimate(0.5, 0.01, ProductCount(single=100), 64).seconds(4)
        6.0
    """

    setup_seconds: float
    seconds_per_product: float
    counts: ProductCount
    input_dim: int
    seconds_per_kind: dict[str, float] = field(default_factory=dict)

    @property
    def products(self) -> int:
        """All products of one example, whatever their batching."""
        return self.counts.total

    @property
    def seconds_per_example(self) -> float:
        """Predicted seconds for one example."""
        rates = {**self.seconds_per_kind, "single": self.seconds_per_product}
        counted = {
            "columns": self.counts.columns,
            "solves": self.counts.solves,
            "single": self.counts.single,
            "prefix": self.counts.prefix,
        }
        return self.setup_seconds + sum(
            n * rates.get(k, rates["single"]) for k, n in counted.items()
        )

    def seconds(self, num_examples: int) -> float:
        """Predicted seconds for ``num_examples`` examples."""
        return num_examples * self.seconds_per_example


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rates(op: LeakageOperator, counts: ProductCount, draws: int) -> dict[str, float]:
    """Seconds per product of each kind ``counts`` needs, from one timed batch of each."""
    eye = torch.eye(op.input_dim, dtype=op.dtype, device=op.gradient.device)
    products = op.batched_products()
    rates: dict[str, float] = {}
    if counts.columns:
        width = op.input_dim if products is None else min(products.chunk_size, op.input_dim)
        width = min(width, 8) if products is None else width
        rates["columns"] = _timed(lambda: op.gram_matmul(eye[:width])) / width
    if counts.solves:
        width = min(counts.solve_width or draws, op.input_dim)
        rates["solves"] = _timed(lambda: op.gram_matmul(eye[:width])) / width
    if counts.prefix and products is not None:
        if chosen_stem(products) is not None:  # "auto" takes the closed-form stem
            rates["prefix"] = _timed(products.stem_factors) / op.input_dim
        else:
            width = min(4 * products.chunk_size, op.input_dim)
            rates["prefix"] = _timed(lambda: products.prefix_columns(eye[:width])) / width
    return rates


@full_precision()
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
    """Time one example's operator and each kind of product; predict one measurement's cost.

    Args:
        model: The network (as for :func:`~lightning_privacy.leakage.estimate_leakage`).
        inputs: Held-out examples; the first one is timed.
        targets: Their targets.
        estimator: A name in :data:`~lightning_privacy.leakage.ESTIMATORS`.
        loss_fn: The loss of the shared gradient.
        layers: Observed parameters.
        num_delta_samples: δ draws per example.
        method: ``"auto"``, ``"dense"``, ``"pcg"`` or ``"cg"``.
        dense_limit: Largest input dimension of the dense path under ``"auto"``.

    Returns:
        A :class:`CostEstimate`.
    """
    context = EstimationContext(
        num_delta_samples=num_delta_samples, method=method, dense_limit=dense_limit
    )
    counts = ESTIMATORS.create(estimator).products(inputs[:1].numel(), context)
    if isinstance(counts, int):  # an estimator written before ProductCount: single products
        counts = ProductCount(single=counts)
    start = time.perf_counter()
    op = LeakageOperator(model, inputs[:1], targets[:1], loss_fn=loss_fn, layers=layers)
    if counts.columns or counts.solves or counts.prefix:
        op.batched_products()  # built and checked once per example, so part of the setup
    setup = time.perf_counter() - start
    probe = torch.eye(op.input_dim, dtype=op.dtype, device=op.gradient.device)[0]
    singles = sorted(_timed(lambda: op.gram_matvec(probe)) for _ in range(TIMED_PRODUCTS))
    rates = _rates(op, counts, num_delta_samples)
    return CostEstimate(setup, singles[len(singles) // 2], counts, op.input_dim, rates)
