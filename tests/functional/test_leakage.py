import math

import pytest
import torch
from torch import nn

from lightning_privacy.functional.leakage import (
    DenseGramSolver,
    GramFactorization,
    LeakageOperator,
    MatrixFreeGramSolver,
    conjugate_gradient,
    expected_gaussian_i2f,
    gram_of_rows,
    gram_solver,
    hutchinson_trace_inverse,
    i2f,
    i2f_from_operator,
    i2f_lower_bound,
    lanczos_lambda_max,
    predicted_psnr,
)


def tiny_net(seed=0, out=4):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, stride=2, padding=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(96, out),
    ).double()
    for p in net.parameters():
        nn.init.uniform_(p, -0.5, 0.5)
    return net


def dense_jacobian(model, x, y, params=None):
    params = list(model.parameters()) if params is None else params

    def flat_grad(inp):
        loss = nn.functional.cross_entropy(model(inp), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    jac = torch.autograd.functional.jacobian(flat_grad, x)  # (d_theta, *x.shape)
    return jac.reshape(jac.shape[0], -1).T  # (d_x, d_theta)


@pytest.fixture(scope="module")
def setup():
    model = tiny_net()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([2])
    J = dense_jacobian(model, x, y)
    assert torch.linalg.matrix_rank(J) == 64
    delta = 1e-2 * torch.randn(J.shape[1], generator=gen, dtype=torch.float64)
    return model, x, y, J, delta


def rel(a, b):
    return float((torch.as_tensor(a) - torch.as_tensor(b)).norm() / torch.as_tensor(b).norm())


def test_products_match_dense_jacobian(setup):
    model, x, y, J, delta = setup
    op = LeakageOperator(model, x, y)
    assert (op.input_dim, op.param_dim) == tuple(J.shape)
    v = torch.randn(op.input_dim, dtype=torch.float64)
    assert rel(op.jvp(delta).reshape(-1), J @ delta) < 1e-10
    assert rel(op.jt(v), J.T @ v) < 1e-10
    assert rel(op.gram_matvec(v), J @ (J.T @ v)) < 1e-10
    assert rel(op.gram(), J @ J.T) < 1e-10
    assert rel(op.gram(row_budget=0), J @ J.T) < 1e-10  # two-pass, no rows of J held
    small = LeakageOperator(model, x, y, chunk_size=5)  # ragged last chunk
    assert rel(small.gram(), J @ J.T) < 1e-10 and rel(small.gram(row_budget=0), J @ J.T) < 1e-10
    batch = torch.stack([delta, 2 * delta, -delta])
    assert rel(op.jvp(batch).reshape(3, -1), batch @ J.T) < 1e-10


def test_jacobian_rows_and_gram_of_rows(setup):
    model, x, y, J, _ = setup
    rows = LeakageOperator(model, x, y, chunk_size=7).jacobian_rows()  # ragged last chunk
    assert rows.shape == J.shape and rel(rows, J) < 1e-12
    gram = gram_of_rows(rows)  # BLAS syrk, one triangle
    fallback = gram_of_rows(rows, use_blas=False, block=5)  # torch blocks below the diagonal
    assert rel(gram, J @ J.T) < 1e-12 and rel(fallback, J @ J.T) < 1e-12
    assert torch.equal(gram, gram.T) and torch.equal(fallback, fallback.T)
    gram32 = gram_of_rows(rows.float())  # float32 products, float64 result
    assert gram32.dtype == torch.float64 and rel(gram32, J @ J.T) < 1e-5


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_exact_i2f_matches_dense_solve(setup, method):
    model, x, y, J, delta = setup
    ref = torch.linalg.solve(J @ J.T, J @ delta).norm()
    got = i2f(model, x, y, delta, method=method, tol=1e-12, max_iterations=2000)
    assert rel(got.value[0], ref) < 1e-4
    assert got.method == method and got.converged
    # the lower bound sits below, and the matching upper bound above
    lam = torch.linalg.eigvalsh(J @ J.T)
    assert (J @ delta).norm() / lam[-1] <= got.value[0] <= (J @ delta).norm() / lam[0]


@pytest.mark.parametrize("damping", [1e-4, 1e-2])
def test_damped_i2f_matches_dense_solve(setup, damping):
    model, x, y, J, delta = setup
    ref = torch.linalg.solve(J @ J.T + damping * torch.eye(64, dtype=J.dtype), J @ delta).norm()
    assert rel(i2f(model, x, y, delta, damping=damping).value[0], ref) < 1e-6
    cg = i2f(model, x, y, delta, damping=damping, method="cg", tol=1e-12)
    assert rel(cg.value[0], ref) < 1e-4
    # damping shrinks the estimate towards ‖Jδ‖/λ
    assert i2f(model, x, y, delta, damping=damping).value[0] < i2f(model, x, y, delta).value[0]


def test_lower_bound_uses_lanczos_lambda_max(setup):
    model, x, y, J, delta = setup
    lam = torch.linalg.eigvalsh(J @ J.T)[-1]
    res = i2f_lower_bound(model, x, y, delta, generator=torch.Generator().manual_seed(0))
    assert res.lanczos.converged and 1 <= res.lanczos.iterations <= 64
    assert abs(res.lambda_max - float(lam)) / float(lam) < 1e-6
    assert rel(res.value[0], (J @ delta).norm() / lam) < 1e-6


def test_eigenvector_direction_gives_inverse_singular_value(setup):
    model, x, y, J, _ = setup
    _, s, vh = torch.linalg.svd(J, full_matrices=False)
    for i in (0, 20, 63):
        got = i2f(model, x, y, 3.0 * vh[i]).value[0]
        assert abs(float(got) - 3.0 / float(s[i])) / (3.0 / float(s[i])) < 1e-6


def test_gaussian_expectation_is_trace_and_matches_monte_carlo(setup):
    model, x, y, J, _ = setup
    op = LeakageOperator(model, x, y)
    fact = GramFactorization(op.gram())
    tr = torch.trace(torch.linalg.inv(J @ J.T))
    assert rel(fact.trace_inverse(), tr) < 1e-6
    std = 1e-3
    expected = expected_gaussian_i2f(fact, std=std)
    assert abs(expected - std * math.sqrt(float(tr))) / expected < 1e-8
    gen = torch.Generator().manual_seed(3)
    draws = std * torch.randn(400, op.param_dim, generator=gen, dtype=torch.float64)
    mc = i2f_from_operator(op, draws, factorization=fact).value
    assert abs(float(mc.pow(2).mean().sqrt()) - expected) / expected < 0.1
    damped = GramFactorization(op.gram(), spectrum=True)
    lam = torch.linalg.eigvalsh(J @ J.T)
    assert rel(damped.trace_inverse(1e-3), (lam / (lam + 1e-3) ** 2).sum()) < 1e-8


def test_batch_per_sample_blocks():
    model = tiny_net(out=10)
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([1, 7])
    J = dense_jacobian(model, x, y)
    assert torch.linalg.matrix_rank(J) == 128
    delta = 1e-2 * torch.randn(J.shape[1], generator=gen, dtype=torch.float64)
    err = torch.linalg.solve(J @ J.T, J @ delta).reshape(2, -1)
    got = i2f(model, x, y, delta)
    assert rel(got.per_sample[0], err.norm(dim=1)) < 1e-6
    assert rel(got.value[0], err.norm()) < 1e-6


def test_layer_subset_restricts_columns(setup):
    model, x, y, _, _ = setup
    params = [p for n, p in model.named_parameters() if n.startswith("3.")]
    J = dense_jacobian(model, x, y, params)  # only the linear layer is observed
    gen = torch.Generator().manual_seed(2)
    delta = [1e-2 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    flat = torch.cat([d.reshape(-1) for d in delta])
    op = LeakageOperator(model, x, y, layers=r"^3\.")
    assert op.param_dim == J.shape[1]
    assert rel(op.jvp(delta).reshape(-1), J @ flat) < 1e-10
    lb = i2f_lower_bound(model, x, y, delta, layers=r"^3\.")
    assert rel(lb.jdelta_norm[0], (J @ flat).norm()) < 1e-10


def test_float32_matches_float64_reference(setup):
    _model, x, y, J, delta = setup
    model32 = tiny_net().float()
    ref = torch.linalg.solve(J @ J.T, J @ delta).norm()
    got = i2f(model32, x.float(), y, delta.float()).value[0]
    assert rel(got, ref) < 0.05


def test_bad_inputs(setup):
    model, x, y, _J, delta = setup
    with pytest.raises(ValueError, match="one tensor per observed parameter"):
        i2f(model, x, y, [torch.zeros(3)])
    with pytest.raises(ValueError, match="flat tensor of 448"):
        i2f(model, x, y, torch.zeros(447, dtype=torch.float64))
    with pytest.raises(ValueError, match="finite"):
        i2f(model, x, y, torch.full((448,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="damping"):
        i2f(model, x, y, delta, damping=-1.0)
    with pytest.raises(ValueError, match="method"):
        i2f(model, x, y, delta, method="svd")
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(TypeError, match="embeddings"):
        i2f(
            emb,
            torch.tensor([[1, 2, 3]]),
            torch.tensor([0]),
            [torch.zeros_like(p) for p in emb.parameters()],
        )

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, inp):
            return self.lin(inp.round())

    det = Detached()
    with pytest.raises(ValueError, match="differentiable path"):
        i2f(
            det,
            torch.randn(1, 4),
            torch.tensor([0]),
            [torch.zeros_like(p) for p in det.parameters()],
        )


def test_singular_gram_warns_and_uses_pseudo_inverse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 2)).double()  # d_theta = 14 < 3 * 6 inputs
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.tensor([0, 1, 0])
    delta = [1e-2 * torch.ones_like(p) for p in model.parameters()]
    with pytest.warns(UserWarning, match="singular"):
        res = i2f(model, x, y, delta)
    assert torch.isfinite(res.value).all()


def test_lanczos_and_cg_helpers():
    a = torch.diag(torch.linspace(0.01, 5.0, 50, dtype=torch.float64))
    r = lanczos_lambda_max(
        lambda v: a @ v, 50, tol=1e-10, generator=torch.Generator().manual_seed(0)
    )
    assert abs(r.value - 5.0) < 1e-8 and r.converged and r.residual < 1e-8
    short = lanczos_lambda_max(lambda v: a @ v, 50, max_iterations=2, tol=1e-14)
    assert not short.converged and short.iterations == 2
    b = torch.ones(50, dtype=torch.float64)
    sol = conjugate_gradient(lambda v: a @ v, b, tol=1e-12)
    assert sol.converged and torch.allclose(a @ sol.solution, b)
    assert not conjugate_gradient(lambda v: a @ v, b, tol=1e-12, max_iterations=3).converged


def test_predicted_psnr():
    assert float(predicted_psnr(torch.tensor(1.0), 100)) == pytest.approx(20.0)
    # MSE = 0.01 over range 2 -> 10 log10(4 / 0.01)
    assert float(predicted_psnr(1.0, 100, data_range=2.0)) == pytest.approx(26.0206, abs=1e-4)
    with pytest.raises(ValueError):
        predicted_psnr(1.0, 0)


def test_gram_solvers_give_the_same_quantities(setup):
    model, x, y, J, delta = setup
    op = LeakageOperator(model, x, y)
    gram = J @ J.T
    assert gram_solver(op).method == "dense" and gram_solver(op, dense_limit=63).method == "pcg"
    dense = gram_solver(op, method="dense", lanczos_seed=3)
    free = gram_solver(op, method="cg", lanczos_seed=3, tol=1e-12, max_iterations=2000)
    assert isinstance(dense, DenseGramSolver) and isinstance(free, MatrixFreeGramSolver)
    rows = op.jdelta_rows(torch.stack([delta, -2 * delta]))
    assert rows.shape == (2, 64) and rows.dtype == torch.float64
    assert op.jdelta_rows(delta).shape == (1, 64)
    ref = torch.linalg.solve(gram, rows.T).T.norm(dim=-1)
    assert rel(dense.solve_norms(rows), ref) < 1e-6 and rel(free.solve_norms(rows), ref) < 1e-4
    solved = free.solve(rows)
    assert solved.converged and len(solved.iterations) == 2
    assert dense.solve(rows).iterations == () and dense.solve(rows).converged
    lam = float(torch.linalg.eigvalsh(gram)[-1])
    assert abs(dense.lanczos().value - lam) / lam < 1e-8
    assert abs(free.lanczos().value - lam) / lam < 1e-6
    assert dense.trace() == pytest.approx(float(torch.trace(gram)), rel=1e-10)
    assert dense.trace_inverse() == pytest.approx(
        float(torch.trace(torch.linalg.inv(gram))), rel=1e-6
    )
    # the matrix-free traces are Hutchinson estimates on the solver's generator
    probes = gram_solver(
        op, method="cg", num_probes=400, generator=torch.Generator().manual_seed(0)
    )
    assert 0.8 < probes.trace() / dense.trace() < 1.2
    same = gram_solver(op, method="cg", num_probes=3, generator=torch.Generator().manual_seed(1))
    assert same.trace_inverse() == hutchinson_trace_inverse(
        op, num_probes=3, generator=torch.Generator().manual_seed(1)
    )
    # damped: the eigendecomposition at once, the same solves as a later one
    damped = DenseGramSolver.assemble(op, damping=1e-3)
    assert damped.factorization.eigenvalues is not None
    lazy = DenseGramSolver(GramFactorization(op.gram()), damping=1e-3)
    assert torch.equal(damped.solve_norms(rows), lazy.solve_norms(rows))
    with pytest.raises(ValueError, match="method"):
        gram_solver(op, method="svd")


def test_matrix_free_solver_warns_when_cg_stops_early(setup):
    model, x, y, _J, delta = setup
    op = LeakageOperator(model, x, y)
    capped = MatrixFreeGramSolver(op, max_iterations=2)
    with pytest.warns(UserWarning, match="Conjugate gradients stopped before tol"):
        solved = capped.solve(op.jdelta_rows(delta))
    assert not solved.converged and solved.iterations == (2,)
    with pytest.warns(UserWarning, match="Conjugate gradients stopped before tol"):
        res = i2f(model, x, y, delta, method="cg", max_iterations=2)
    assert res.method == "cg" and not res.converged and res.iterations == (2,)


def test_issue14_item10_a_nan_model_is_named_as_nan_not_as_a_detached_input():
    # Before 8dc7662 a NaN weight reached the zero-Jacobian check and was reported as
    # "∇ₓ∇_θ L is zero (the inputs are detached ...)", pointing the user at the wrong cause.
    net = tiny_net()
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] = float("nan")
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="NaN or inf") as caught:
        LeakageOperator(net, x, torch.tensor([1]))
    assert "detached" not in str(caught.value)


class _SquareNoForwardAD(torch.autograd.Function):
    """``x²`` with a backward but no forward-mode rule (a user's custom op)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _CustomOpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(_SquareNoForwardAD.apply(self.a(x.flatten(1))))


def test_j_delta_forward_mode_matches_the_reverse_product():
    net = tiny_net()
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    op = LeakageOperator(net, x, torch.tensor([1]))
    deltas = torch.randn(3, op.param_dim, generator=torch.Generator().manual_seed(0)).double()
    reverse = torch.stack([op._j(d)[0] for d in deltas])
    assert op._j_along is not None
    assert torch.allclose(op.jvp(deltas), reverse, rtol=1e-10, atol=1e-12)
    assert torch.allclose(op.jvp(deltas[0]), reverse[0], rtol=1e-10, atol=1e-12)


def test_j_delta_falls_back_where_an_op_has_no_forward_mode_rule():
    torch.manual_seed(0)
    net = _CustomOpNet().double()
    x = torch.rand(1, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([2])
    op = LeakageOperator(net, x, y)
    deltas = torch.randn(2, op.param_dim, generator=torch.Generator().manual_seed(1)).double()
    jac = dense_jacobian(net, x, y)  # (d_x, d_θ)
    out = op.jvp(deltas)
    assert op._j_along is None  # the forward-mode path was tried and given up
    assert torch.allclose(out.reshape(2, -1), deltas @ jac.T, rtol=1e-8, atol=1e-10)
