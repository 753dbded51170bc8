"""Block conjugate gradients, the approximate I2F's solve, checked against direct solves."""

import pytest
import torch
from torch import nn

from lightning_privacy.functional.leakage import (
    LeakageOperator,
    PreconditionedGramSolver,
    block_conjugate_gradient,
    preconditioned_conjugate_gradient,
)
from lightning_privacy.functional.leakage_products import MeasurementTimeoutError
from lightning_privacy.leakage.estimators import ApproximateI2F


def ill_conditioned(n=200, condition=1e6, seed=0):
    """An SPD matrix with log-spaced eigenvalues in a random basis, and 4 right-hand sides."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    values = torch.logspace(-torch.log10(torch.tensor(condition)).item(), 0, n, dtype=torch.float64)
    a = basis @ torch.diag(values) @ basis.T
    return (a + a.T) / 2, torch.randn(4, n, generator=gen, dtype=torch.float64), gen


def test_block_cg_solves_to_the_direct_solution():
    a, b, _ = ill_conditioned(condition=1e4)
    res = block_conjugate_gradient(lambda v: v @ a, b, tol=1e-10)
    direct = torch.linalg.solve(a, b.T).T
    assert res.converged and max(res.relative_residual) <= 1e-10
    assert torch.allclose(res.solution, direct, rtol=1e-6, atol=1e-8 * float(direct.abs().max()))


def test_widening_the_block_cuts_the_passes_on_an_ill_conditioned_matrix():
    a, b, gen = ill_conditioned()
    narrow = block_conjugate_gradient(lambda v: v @ a, b, tol=1e-8)
    extra = torch.randn(12, a.shape[0], generator=gen, dtype=torch.float64)
    wide = block_conjugate_gradient(lambda v: v @ a, b, augment=extra, tol=1e-8)
    passes = narrow.iterations[0]
    alone = preconditioned_conjugate_gradient(lambda v: v @ a, b, tol=1e-8, max_iterations=passes)
    assert narrow.converged and wide.converged and not alone.converged  # sharing already pays
    assert wide.iterations[0] * 3 < passes
    direct = torch.linalg.solve(a, b.T).T
    assert torch.allclose(wide.solution, direct, rtol=1e-4, atol=1e-6 * float(direct.abs().max()))


def test_block_cg_with_a_preconditioner_and_damping():
    a, b, _ = ill_conditioned(n=60, condition=1e3)
    diag = a.diagonal()
    res = block_conjugate_gradient(lambda v: v @ a, b, lambda r: r / diag, damping=0.5, tol=1e-10)
    direct = torch.linalg.solve(a + 0.5 * torch.eye(60, dtype=torch.float64), b.T).T
    assert torch.allclose(res.solution, direct, rtol=1e-6, atol=1e-9)


def test_dependent_right_hand_sides_are_dropped_not_divided_by():
    a, b, _ = ill_conditioned(n=30, condition=1e2)
    twice = torch.cat([b[:1], b[:1], 2 * b[:1]])  # one direction three times
    res = block_conjugate_gradient(lambda v: v @ a, twice, tol=1e-10)
    direct = torch.linalg.solve(a, twice.T).T
    assert torch.isfinite(res.solution).all() and res.converged
    assert torch.allclose(res.solution, direct, rtol=1e-6, atol=1e-9)


def test_block_cg_stops_at_the_deadline():
    a, b, _ = ill_conditioned(n=30)
    with pytest.raises(MeasurementTimeoutError, match="block CG stopped after 0 iterations"):
        block_conjugate_gradient(lambda v: v @ a, b, deadline=0.0)


def test_block_solver_is_the_independent_one_on_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    op = LeakageOperator(model, torch.rand(1, 3, 2, 2), torch.tensor([2]))
    rows = torch.randn(3, op.input_dim, generator=torch.Generator().manual_seed(1))
    alone = PreconditionedGramSolver.build(op, tol=1e-9).solve(rows).solution
    block = PreconditionedGramSolver.build(op, tol=1e-9, block_size=8).solve(rows).solution
    assert torch.allclose(block, alone, rtol=1e-5, atol=1e-8)


def test_block_size_is_checked():
    with pytest.raises(ValueError, match="block_size"):
        ApproximateI2F(block_size=-1)
    op = LeakageOperator(nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([1]))
    with pytest.raises(ValueError, match="block_size"):
        PreconditionedGramSolver.build(op, block_size=-2)
