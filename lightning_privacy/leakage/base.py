"""The interface of leakage estimators, their registry and their results.

An estimator is a small component (a frozen dataclass, registered in :data:`ESTIMATORS`) that
estimates ONE example shared alone: from the example's operator ``J = ∇_x ∇_θ L``
(:class:`~lightning_privacy.functional.leakage.LeakageOperator`) and an
:class:`EstimationContext` (the defense and its δ draws, the Gram solver chosen by ``method``,
the PSNR scale) it returns one :class:`SampleEstimate`.
:func:`~lightning_privacy.leakage.estimate_leakage` runs it on every example of a batch and
assembles the :class:`LeakageEstimate`. A class registered with ``@ESTIMATORS.register("name")``
is accepted wherever an estimator name is (``estimate_leakage(estimator=)``,
``LeakageMonitor(estimator=)``); ``check_defense`` rejects pipelines it cannot handle.

Example:
    >>> import torch
    >>> from dataclasses import dataclass
    >>> from lightning_privacy.functional.leakage import LeakageOperator
    >>> @dataclass(frozen=True)
    ... class FirstDraw(LeakageEstimator):
    ...     '''The I2F of one draw of δ.'''
    ...     def estimate(self, op, context):
    ...         solver = context.gram_solver(op)
    ...         deltas = context.draw_deltas(op, num_draws=1)
    ...         value = float(solver.solve_norms(op.jdelta_rows(deltas))[0])
    ...         return context.sample_estimate(op, i2f=value, lower_bound=0.0,
    ...             lanczos=solver.lanczos(), delta_sq_norm=mean_square_norm(deltas))
    >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([0]))
    >>> FirstDraw().estimate(op, EstimationContext()).i2f  # no defense: δ = 0
    0.0
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_privacy._registry import Registry
from lightning_privacy.defenses.base import GradientTransform, apply_transforms
from lightning_privacy.functional.leakage import (
    GramSolver,
    LanczosResult,
    LeakageOperator,
    gram_solver,
    predicted_psnr,
)

#: ``‖δ‖ / ‖g‖`` up to which the I2F was checked against a converged attack (README, I2F fidelity:
#: error ÷ I2F 0.95-1.16, rank correlation >= 0.92). Beyond it the first-order expansion departs
#: from the attack (an unclamped attack does worse than predicted) and the estimate is uncalibrated.
VALIDATED_RELATIVE_PERTURBATION = 0.06
#: Lanczos steps budgeted for ``λ_max`` in the cost estimate (``lanczos_lambda_max``'s cap).
LANCZOS_ITERATIONS = 64
#: Preconditioned CG iterations budgeted per solve to ``tol=1e-6`` in the cost estimate (the
#: models of ``benchmarks/i2f_scale.py`` need 40-100).
PCG_ITERATIONS = 120


@dataclass(frozen=True)
class ProductCount:
    """The ``J Jᵀ``-sized products one example needs, by how they are batched (for the cost).

    Attributes:
        columns: Columns ``J Jᵀ e_i`` formed in full batches (the dense assembly).
        solves: Products in batches of the δ draws or probes (conjugate-gradient iterations).
        single: Products one at a time (Lanczos on the operator, ``J δ``, plain CG).
        prefix: Columns of the first layers' Gram matrix (the preconditioner; cheaper).
        solve_width: Rows per batched solve product (``0``: one per δ draw).

    Example:
        >>> ProductCount(columns=3072, single=4).total
        3076
    """

    columns: int = 0
    solves: int = 0
    single: int = 0
    prefix: int = 0
    solve_width: int = 0

    @property
    def total(self) -> int:
        """All products, whatever their batching."""
        return self.columns + self.solves + self.single + self.prefix


def defense_delta(
    transforms: Sequence[GradientTransform],
    gradients: Sequence[Tensor],
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """One draw of ``δ = defended - original`` for any transform pipeline.

    Args:
        transforms: The ``GradientTransform`` pipeline (applied in order, as in the Trainer).
        gradients: The original gradients (not modified).
        generator: Source of the defense's randomness.

    Returns:
        ``δ`` per gradient tensor.

    Example:
        >>> from lightning_privacy.defenses.base import GradientTransform
        >>> class Halve(GradientTransform):
        ...     def __call__(self, gradients, *, generator=None):
        ...         return [g / 2 for g in gradients]
        >>> defense_delta([Halve()], [torch.ones(2)])
        [tensor([-0.5000, -0.5000])]
    """
    gradients = list(gradients)
    defended = apply_transforms(transforms, gradients, generator=generator)
    return [d - g for d, g in zip(defended, gradients, strict=True)]


def mean_square_norm(rows: Tensor) -> float:
    """Mean of ``‖δ‖²`` over the draws held as the rows of a ``(k, d)`` tensor (in float64).

    Example:
        >>> mean_square_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        13.0
    """
    return float((rows.double().norm(dim=-1) ** 2).mean())


def _relative(delta_norm: float, gradient_norm: float) -> float:
    if delta_norm == 0.0:
        return 0.0
    return delta_norm / gradient_norm if gradient_norm > 0 else math.inf


@dataclass(frozen=True)
class SampleEstimate:
    """The estimate for one example shared alone.

    Attributes:
        i2f: The estimate (what the estimator stands for: the mean I2F of the draws, its
            root-mean-square, the lower bound, ...).
        lower_bound: ``‖J δ‖ / λ_max`` (mean over the draws, or from ``E ‖J δ‖²``).
        lanczos: The Lanczos run that gave ``λ_max(J Jᵀ)``.
        relative_perturbation: ``‖δ‖ / ‖g‖`` (root-mean-square over the draws).
        predicted_psnr: PSNR in dB a perfect attacker would reach (``MSE = I2F² / d_x``).

    Example:
        >>> run = LanczosResult(value=2.0, iterations=3, converged=True, residual=0.0)
        >>> SampleEstimate(0.1, 0.05, run, 0.01, 30.0).lambda_max
        2.0
    """

    i2f: float
    lower_bound: float
    lanczos: LanczosResult
    relative_perturbation: float
    predicted_psnr: float

    @property
    def lambda_max(self) -> float:
        """``λ_max(J Jᵀ)``, from :attr:`lanczos`."""
        return self.lanczos.value


@dataclass(frozen=True)
class EstimationContext:
    """What an estimator needs besides the example's operator: the defense and the run settings.

    Attributes:
        transforms: The defense pipeline the attacker faces.
        defended: Indices (in ``op.names``) of the observed parameters the transforms act on
            (δ is zero on the others); ``None`` for all of them.
        num_delta_samples: δ draws per example (and Hutchinson probes on the matrix-free path).
        damping: ``λ >= 0`` in ``(J Jᵀ + λ I)⁻¹``.
        generator: Source of the defense's randomness (and of the probes).
        method: ``"dense"``, ``"pcg"``, ``"cg"`` or ``"auto"`` (see
            :func:`~lightning_privacy.functional.leakage.gram_solver`).
        dense_limit: Largest input dimension for the dense path under ``"auto"``.
        data_range: Input value range for the predicted PSNR.
        example_index: Position of the example in its batch (seeds its Lanczos start vector).
        deadline: ``time.perf_counter()`` value past which the solvers start no further batch of
            products (they raise ``MeasurementTimeoutError``; ``estimate_leakage`` keeps the
            examples finished before).

    Example:
        >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([0]))
        >>> context = EstimationContext(num_delta_samples=2)
        >>> context.draw_deltas(op).shape, context.gram_solver(op).method
        (torch.Size([2, 8]), 'dense')
    """

    transforms: Sequence[GradientTransform] = ()
    defended: tuple[int, ...] | None = None
    num_delta_samples: int = 4
    damping: float = 0.0
    generator: torch.Generator | None = None
    method: str = "auto"
    dense_limit: int = 4096
    data_range: float = 1.0
    example_index: int = 0
    deadline: float | None = None

    def resolved_method(self, input_dim: int) -> str:
        """The method an example of ``input_dim`` values gets (``"auto"`` resolved).

        Example:
            >>> EstimationContext(dense_limit=10).resolved_method(11)
            'pcg'
        """
        if self.method == "auto":
            return "dense" if input_dim <= self.dense_limit else "pcg"
        return self.method

    def uses_dense_path(self, input_dim: int) -> bool:
        """Whether an example of ``input_dim`` values is assembled densely (see ``method``).

        Example:
            >>> EstimationContext(dense_limit=10).uses_dense_path(11)
            False
        """
        return self.resolved_method(input_dim) == "dense"

    def defended_indices(self, op: LeakageOperator) -> list[int]:
        """The indices in ``op.names`` of the parameters the transforms act on.

        Example:
            >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([0]))
            >>> all_of_them, bias_only = EstimationContext(), EstimationContext(defended=(1,))
            >>> all_of_them.defended_indices(op), bias_only.defended_indices(op)
            ([0, 1], [1])
        """
        return list(range(len(op.names))) if self.defended is None else list(self.defended)

    def defended_size(self, op: LeakageOperator) -> int:
        """How many gradient entries the transforms act on (the dimension of their noise).

        Example:
            >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([0]))
            >>> EstimationContext(defended=(1,)).defended_size(op)  # the bias only
            2
        """
        return sum(op.numels[i] for i in self.defended_indices(op))

    def draw_deltas(
        self,
        op: LeakageOperator,
        transforms: Sequence[GradientTransform] | None = None,
        num_draws: int | None = None,
    ) -> Tensor:
        """Draws of ``δ`` on the example's gradient as ``(k, d_θ)`` rows in ``op``'s layout.

        Args:
            op: The example's operator (its gradient is what the defense transforms).
            transforms: The pipeline to draw from (default: :attr:`transforms`).
            num_draws: ``k`` (default: :attr:`num_delta_samples`).

        Example:
            >>> from lightning_privacy.defenses import MagnitudePruning
            >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([0]))
            >>> context = EstimationContext(transforms=[MagnitudePruning(ratio=0.0)])
            >>> context.draw_deltas(op, num_draws=3).abs().sum().item()  # prunes nothing
            0.0
        """
        transforms = self.transforms if transforms is None else transforms
        num_draws = self.num_delta_samples if num_draws is None else num_draws
        defended = self.defended_indices(op)
        grads = [
            g.reshape(s)
            for g, s in zip(torch.split(op.gradient, op.numels), op.shapes, strict=True)
        ]
        rows = []
        for _ in range(num_draws):
            part = defense_delta(transforms, [grads[i] for i in defended], self.generator)
            full = [torch.zeros_like(g) for g in grads]
            for i, d in zip(defended, part, strict=True):
                full[i] = d
            rows.append(op.flatten_delta(full)[0])
        return torch.stack(rows)

    def gram_solver(self, op: LeakageOperator, method: str | None = None) -> GramSolver:
        """The example's Gram solver: dense or matrix-free by :attr:`method`, :attr:`dense_limit`.

        Args:
            op: The example's operator.
            method: Overrides :attr:`method` (``"cg"`` never assembles ``J Jᵀ``).

        Example:
            >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([0]))
            >>> context = EstimationContext(dense_limit=2)
            >>> context.gram_solver(op).method, context.gram_solver(op, method="dense").method
            ('pcg', 'dense')
        """
        return gram_solver(
            op,
            method=self.method if method is None else method,
            dense_limit=self.dense_limit,
            damping=self.damping,
            lanczos_seed=self.example_index,
            num_probes=self.num_delta_samples,
            generator=self.generator,
            deadline=self.deadline,
        )

    def sample_estimate(
        self,
        op: LeakageOperator,
        *,
        i2f: float,
        lower_bound: float,
        lanczos: LanczosResult,
        delta_sq_norm: float,
    ) -> SampleEstimate:
        """The :class:`SampleEstimate`, with ``‖δ‖ / ‖g‖`` and the predicted PSNR filled in.

        Args:
            op: The example's operator.
            i2f: The estimate.
            lower_bound: ``‖J δ‖ / λ_max``.
            lanczos: The ``λ_max`` run.
            delta_sq_norm: ``E ‖δ‖²`` (the mean over the draws, or its closed form).

        Example:
            >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([0]))
            >>> run = LanczosResult(value=2.0, iterations=3, converged=True, residual=0.0)
            >>> sample = EstimationContext().sample_estimate(
            ...     op, i2f=0.03, lower_bound=0.01, lanczos=run, delta_sq_norm=0.0)
            >>> round(sample.predicted_psnr, 2), sample.relative_perturbation  # 10 log10(3 / 0.03²)
            (35.23, 0.0)
        """
        return SampleEstimate(
            i2f=i2f,
            lower_bound=lower_bound,
            lanczos=lanczos,
            relative_perturbation=_relative(math.sqrt(delta_sq_norm), float(op.gradient.norm())),
            predicted_psnr=float(predicted_psnr(i2f, op.input_dim, data_range=self.data_range)),
        )


class LeakageEstimator(ABC):
    """Base class of leakage estimators: one example shared alone -> one :class:`SampleEstimate`.

    Subclasses are frozen dataclasses registered in :data:`ESTIMATORS`; the module docs show one.

    Attributes:
        predicts_i2f: Whether the value estimates the I2F itself (``False`` for a bound, whose
            PSNR is then logged as ``psnr_upper_bound``, never as ``predicted_psnr``).

    Example:
        >>> from lightning_privacy.leakage import create_estimator
        >>> isinstance(create_estimator("exact"), LeakageEstimator)
        True
    """

    predicts_i2f: ClassVar[bool] = True

    def check_defense(self, transforms: Sequence[GradientTransform]) -> None:
        """Raise ``ValueError`` for a pipeline the estimator cannot handle (default: any is fine).

        Example:
            >>> from lightning_privacy.leakage import create_estimator
            >>> create_estimator("exact").check_defense([]) is None
            True
        """
        return None

    @abstractmethod
    def estimate(self, op: LeakageOperator, context: EstimationContext) -> SampleEstimate:
        """Estimate the example whose operator is ``op``."""

    def products(self, input_dim: int, context: EstimationContext) -> ProductCount:
        """The ``J Jᵀ``-sized products one example needs (for the cost estimate before training).

        Dense path: the ``d_x`` columns plus one ``J δ`` per draw; ``"pcg"``: the preconditioner,
        :data:`PCG_ITERATIONS` batched iterations per draw with Lanczos's vector riding in the
        same batches, and one ``J δ`` per draw; ``"cg"``:
        Lanczos and, per draw, at most ``min(d_x, 200)`` iterations.

        Example:
            >>> from lightning_privacy.leakage import create_estimator
            >>> create_estimator("exact").products(64, EstimationContext(num_delta_samples=4))
            ProductCount(columns=64, solves=0, single=4, prefix=0, solve_width=0)
        """
        draws = context.num_delta_samples
        method = context.resolved_method(input_dim)
        if method == "dense":
            return ProductCount(columns=input_dim, single=draws)
        if method == "pcg":
            solves = PCG_ITERATIONS * draws + LANCZOS_ITERATIONS  # Lanczos rides in the batches
            return ProductCount(prefix=input_dim, solves=solves, single=draws)
        return ProductCount(single=LANCZOS_ITERATIONS + draws * (1 + min(input_dim, 200)))


ESTIMATORS: Registry[LeakageEstimator] = Registry("estimator")


def create_estimator(name: str, **kwargs: Any) -> LeakageEstimator:
    """Build the estimator registered under ``name`` with settings ``kwargs``.

    Example:
        >>> type(create_estimator("lower_bound")).__name__
        'LowerBound'
        >>> try:
        ...     create_estimator("exat")
        ... except ValueError as err:
        ...     print(str(err).split(" Available")[0])
        Unknown estimator 'exat'. Did you mean 'exact'?
    """
    return ESTIMATORS.create(name, **kwargs)


def list_estimators() -> list[str]:
    """Names accepted by :func:`create_estimator` and ``estimate_leakage(estimator=)``.

    Example:
        >>> list_estimators()
        ['approximate', 'exact', 'expected', 'lower_bound']
    """
    return ESTIMATORS.names()


@dataclass(frozen=True)
class LeakageEstimate:
    """Per-sample I2F estimates for a held-out batch and their summaries.

    Attributes:
        estimator: The estimator's name (what ``per_sample_i2f`` is; see :func:`list_estimators`).
        per_sample_i2f: ``(B,)`` the estimate per example (mean over δ draws for ``"exact"``;
            root-mean-square ``sqrt(E I2F²)`` for ``"expected"``).
        per_sample_lower_bound: ``(B,)`` ``‖J δ‖ / λ_max`` (mean over the same draws).
        lambda_max: ``(B,)`` ``λ_max(J Jᵀ)`` per example.
        predicted_psnr: ``(B,)`` PSNR a perfect attacker would reach (``MSE = I2F² / d_x``).
        targets: ``(B,)`` the labels, for per-class summaries.
        relative_perturbation: ``(B,)`` ``‖δ‖ / ‖g‖`` per example (root-mean-square over the draws;
            in closed form for ``"expected"``): how far the I2F's linearisation is stretched.
            Above :data:`VALIDATED_RELATIVE_PERTURBATION` the estimate is not calibrated.
        per_class_predicted_psnr: ``{class: mean predicted PSNR}``.
        lanczos: One :class:`LanczosResult` per example (``λ_max`` iterations and convergence).
        requested: Examples asked for (more than were estimated when ``max_seconds`` ran out).

    Example:
        >>> run = LanczosResult(value=2.0, iterations=3, converged=True, residual=0.0)
        >>> samples = [SampleEstimate(0.1, 0.05, run, 0.01, 30.0),
        ...            SampleEstimate(0.2, 0.1, run, 0.08, 24.0)]
        >>> est = LeakageEstimate.from_samples("exact", samples, torch.tensor([0, 1]))
        >>> round(est.i2f, 6), est.worst_sample_predicted_psnr, est.beyond_validated_range
        (0.15, 30.0, True)
    """

    estimator: str
    per_sample_i2f: Tensor
    per_sample_lower_bound: Tensor
    lambda_max: Tensor
    predicted_psnr: Tensor
    targets: Tensor
    relative_perturbation: Tensor
    per_class_predicted_psnr: dict[int, float] = field(default_factory=dict)
    lanczos: tuple[LanczosResult, ...] = ()
    requested: int | None = None

    @classmethod
    def from_samples(
        cls,
        estimator: str,
        samples: Sequence[SampleEstimate],
        targets: Tensor,
        *,
        requested: int | None = None,
    ) -> LeakageEstimate:
        """Assemble the batch result from one :class:`SampleEstimate` per example of ``targets``.

        Example:
            >>> run = LanczosResult(value=2.0, iterations=3, converged=True, residual=0.0)
            >>> est = LeakageEstimate.from_samples(
            ...     "exact", [SampleEstimate(0.1, 0.05, run, 0.01, 30.0)], torch.tensor([4]))
            >>> est.lambda_max, est.per_class_predicted_psnr
            (tensor([2.], dtype=torch.float64), {4: 30.0})
        """
        labels = targets.detach().reshape(-1).cpu()
        classes = labels.tolist() if labels.numel() == len(samples) else []  # one label each

        def column(name: str) -> Tensor:
            return torch.tensor([getattr(s, name) for s in samples], dtype=torch.float64)

        psnr = column("predicted_psnr")
        return cls(
            estimator=estimator,
            per_sample_i2f=column("i2f"),
            per_sample_lower_bound=column("lower_bound"),
            lambda_max=column("lambda_max"),
            predicted_psnr=psnr,
            targets=labels,
            relative_perturbation=column("relative_perturbation"),
            per_class_predicted_psnr={
                int(c): float(psnr[labels == c].mean()) for c in sorted(set(classes))
            },
            lanczos=tuple(s.lanczos for s in samples),
            requested=requested,
        )

    @property
    def complete(self) -> bool:
        """Whether every example asked for was estimated (``False``: ``max_seconds`` ran out).

        Example:
            >>> run = LanczosResult(value=2.0, iterations=3, converged=True, residual=0.0)
            >>> samples = [SampleEstimate(0.1, 0.05, run, 0.01, 30.0)]
            >>> LeakageEstimate.from_samples("exact", samples, torch.tensor([0]),
            ...                              requested=4).complete
            False
        """
        return self.requested is None or len(self.per_sample_i2f) >= self.requested

    @property
    def beyond_validated_range(self) -> bool:
        """Whether some example's ``‖δ‖ / ‖g‖`` exceeds :data:`VALIDATED_RELATIVE_PERTURBATION`."""
        return bool(self.relative_perturbation.max() > VALIDATED_RELATIVE_PERTURBATION)

    @property
    def i2f(self) -> float:
        """Mean I2F over the batch."""
        return float(self.per_sample_i2f.mean())

    @property
    def mean_predicted_psnr(self) -> float:
        """Mean predicted PSNR over the batch (dB)."""
        return float(self.predicted_psnr.mean())

    @property
    def worst_sample_predicted_psnr(self) -> float:
        """Highest predicted PSNR: the least protected example (dB)."""
        return float(self.predicted_psnr.max())

    @property
    def worst_class_predicted_psnr(self) -> float:
        """Highest per-class mean predicted PSNR: the least protected class (dB).

        Without one label per example (e.g. a language model's per-token targets) there are no
        classes and this is the worst example's.
        """
        if not self.per_class_predicted_psnr:
            return self.worst_sample_predicted_psnr
        return max(self.per_class_predicted_psnr.values())

    @property
    def predicts(self) -> bool:
        """Whether the estimator estimates the I2F (``False``: a bound, e.g. ``lower_bound``)."""
        if self.estimator not in ESTIMATORS:
            return True
        return bool(getattr(ESTIMATORS.get(self.estimator), "predicts_i2f", True))

    def metrics(self, prefix: str = "leakage/", per_class: bool = False) -> dict[str, float]:
        """Scalars to log: ``i2f``, the bound, ``λ_max``, PSNR summaries, ``‖δ‖ / ‖g‖``.

        A bound-only estimator (:attr:`predicts` false) logs no ``i2f``/``predicted_psnr`` keys:
        its PSNR from ``I2F >= bound`` is an *upper bound* of the prediction,
        ``psnr_upper_bound``, not a prediction.
        """
        shared = {
            f"{prefix}i2f_lower_bound": float(self.per_sample_lower_bound.mean()),
            f"{prefix}lambda_max": float(self.lambda_max.mean()),
            f"{prefix}relative_perturbation": float(self.relative_perturbation.mean()),
        }
        if not self.predicts:
            return {
                **shared,
                f"{prefix}psnr_upper_bound": self.mean_predicted_psnr,
                f"{prefix}worst_sample_psnr_upper_bound": self.worst_sample_predicted_psnr,
            }
        out = {
            f"{prefix}i2f": self.i2f,
            **shared,
            f"{prefix}predicted_psnr": self.mean_predicted_psnr,
            f"{prefix}worst_sample_predicted_psnr": self.worst_sample_predicted_psnr,
            f"{prefix}worst_class_predicted_psnr": self.worst_class_predicted_psnr,
        }
        if per_class:
            for c, v in sorted(self.per_class_predicted_psnr.items()):
                out[f"{prefix}predicted_psnr/class_{c}"] = v
        return out
