"""The closed-form first-layer Gram matrix, and the solver pieces that make the I2F fast at scale.

Each fast piece is checked against the slower path it replaces, on models the library did not
write (torchvision, timm, a plain MLP) and with a custom loss.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchvision.models import resnet18

from lightning_privacy.functional import leakage_products
from lightning_privacy.functional.leakage import (
    GramPreconditioner,
    LanczosIteration,
    LeakageOperator,
    PreconditionedGramSolver,
    chosen_stem,
    lanczos_lambda_max,
)
from lightning_privacy.functional.leakage_products import GramProducts
from lightning_privacy.functional.leakage_stem import StemPreconditioner
from lightning_privacy.leakage import estimate_leakage
from lightning_privacy.leakage.estimators import ApproximateI2F
from lightning_privacy.models import resnet18_cifar


def soft_target_loss(outputs, targets):
    """A loss the library did not write: cross-entropy against smoothed one-hot targets."""
    soft = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype) * 0.8 + 0.02
    return -(soft * F.log_softmax(outputs, -1)).sum(-1).mean()


def vit():
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=4
    )


class Dilated(nn.Module):
    """A first convolution with dilation, 'same' padding and a bias, then a ReLU head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, dilation=2, padding="same")
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).flatten(1))


CASES = {
    "torchvision resnet18": (lambda: resnet18(num_classes=10), (1, 3, 16, 16), F.cross_entropy),
    "resnet18, batch 2": (lambda: resnet18(num_classes=10), (2, 3, 16, 16), F.cross_entropy),
    "resnet18_cifar": (resnet18_cifar, (1, 3, 8, 8), F.cross_entropy),
    "timm vit (curvature)": (vit, (1, 3, 16, 16), F.cross_entropy),
    "mlp, custom loss": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 3)),
        (1, 3, 4, 4),
        soft_target_loss,
    ),
    "dilated conv with bias": (Dilated, (1, 2, 6, 6), soft_target_loss),
}


def products_for(name, seed=0):
    build, shape, loss = CASES[name]
    torch.manual_seed(seed)
    model = build().eval()
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(seed + 1))
    y = torch.arange(shape[0]) % 3
    return GramProducts(model, x, y, loss_fn=loss)


@pytest.mark.parametrize("name", list(CASES))
def test_stem_gram_is_the_first_layers_gram_matrix(name):
    with sdpa_kernel(SDPBackend.MATH):
        products = products_for(name)
        assert products.reads_input()
        stem = products.stem_gram()
        generic = products.prefix_gram(ratio=1e-9)  # the column passes, first layer only
    assert products.prefix_count(ratio=1e-9) == 1
    scale = float(generic.abs().max())
    assert scale > 0
    assert float((stem - generic).abs().max()) <= 1e-5 * scale


def test_stem_gram_covers_only_the_observed_parameters():
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    x, y = torch.rand(1, 3, 16, 16), torch.tensor([4])
    products = GramProducts(model, x, y, observed=["conv1.weight", "fc.weight"])
    stem, generic = products.stem_gram(), products.prefix_gram(ratio=1e-9)
    assert float((stem - generic).abs().max()) <= 1e-5 * float(generic.abs().max())
    whole = GramProducts(model, x, y).stem_gram()
    assert torch.allclose(stem, whole)  # conv1 has no bias: the same layer either way
    head_only = GramProducts(model, x, y, observed=["fc.weight"])
    assert head_only.stem_gram() is None  # the first ruled call is then fc, which reads features


class Normalised(nn.Module):
    """A model that normalises its input before the first convolution (a common user pattern)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.head(F.relu(self.conv((x - 0.5) / 0.25)).flatten(1))


def test_no_stem_when_the_first_layer_does_not_read_the_input_unchanged():
    torch.manual_seed(0)
    model, x, y = Normalised(), torch.rand(1, 1, 6, 6), torch.tensor([1])
    products = GramProducts(model, x, y)
    assert not products.reads_input() and products.stem_gram() is None
    op = LeakageOperator(model, x, y)
    stem = PreconditionedGramSolver.build(op, preconditioner="stem")
    prefix = PreconditionedGramSolver.build(op, preconditioner="prefix")
    assert torch.allclose(stem.preconditioner.factor, prefix.preconditioner.factor)


def test_preconditioner_choice_is_checked():
    op = LeakageOperator(nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"preconditioner.*'stem'.*'diagonal'"):
        PreconditionedGramSolver.build(op, preconditioner="diagonal")
    with pytest.raises(ValueError, match=r"preconditioner.*'diagonal'"):
        ApproximateI2F(preconditioner="diagonal")


@pytest.mark.parametrize("preconditioner", ["stem", "prefix"])
def test_approximate_is_within_two_per_cent_of_exact_with_either_preconditioner(preconditioner):
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    x, y = (
        torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)),
        torch.tensor([1, 7]),
    )
    from lightning_privacy.defenses import GaussianNoise

    def run(estimator):
        return estimate_leakage(
            model,
            x,
            y,
            transforms=[GaussianNoise(std=1e-4)],
            estimator=estimator,
            generator=torch.Generator().manual_seed(5),
            num_delta_samples=2,
        ).per_sample_i2f

    exact = run("exact")
    approximate = run(ApproximateI2F(preconditioner=preconditioner))
    ratio = approximate / exact
    assert bool(((ratio > 0.98) & (ratio <= 1.0 + 1e-4)).all()), ratio


def test_lanczos_rides_in_the_solver_batches_with_the_same_answers(monkeypatch):
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    x, y = torch.rand(1, 3, 16, 16), torch.tensor([2])
    op = LeakageOperator(model, x, y)
    solver = PreconditionedGramSolver.build(op, tol=1e-6, lanczos_tol=1e-4, warn=False)
    rows = op.jdelta_rows(1e-3 * torch.randn(3, op.param_dim))
    alone, top = solver.solve(rows), solver.lanczos()
    calls = []
    original = LeakageOperator.gram_matmul

    def counted(self, batch):
        calls.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(LeakageOperator, "gram_matmul", counted)
    together, shared = solver.solve_with_lanczos(rows)
    # float32 products differ in the last bits with the batch's size, so the counts may too
    difference = (together.solution - alone.solution).norm(dim=1) / alone.solution.norm(dim=1)
    assert float(difference.max()) <= 1e-5
    assert abs(max(together.iterations) - max(alone.iterations)) <= 3
    assert abs(shared.iterations - top.iterations) <= 1
    assert abs(shared.value - top.value) <= 1e-4 * top.value
    assert len(calls) == max(max(together.iterations), shared.iterations)  # no pass of its own
    assert calls[0] == len(rows) + 1


def test_lanczos_iteration_is_lanczos_lambda_max():
    a = torch.diag(torch.linspace(0.1, 7.0, 40, dtype=torch.float64))
    it = LanczosIteration(40, tol=1e-8, generator=torch.Generator().manual_seed(3))
    while not it.done:
        it.step(a @ it.vector)
    direct = lanczos_lambda_max(
        lambda v: a @ v, 40, tol=1e-8, generator=torch.Generator().manual_seed(3)
    )
    assert it.result() == direct and abs(direct.value - 7.0) < 1e-8


def test_explicit_inverse_preconditioner_equals_triangular_solves():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 40, generator=gen, dtype=torch.float64)
    gram = a @ a.T
    explicit, triangular = GramPreconditioner(gram), GramPreconditioner(gram, explicit_limit=0)
    assert explicit.inverse is not None and triangular.inverse is None
    rows = torch.randn(3, 30, generator=gen, dtype=torch.float64)
    assert torch.allclose(explicit.solve(rows), triangular.solve(rows), rtol=1e-8)
    assert explicit.solve(rows @ gram) == pytest.approx(rows, rel=1e-6)
    assert explicit.trace_inverse() == pytest.approx(triangular.trace_inverse(), rel=1e-9)


@pytest.mark.parametrize(
    "norm, shape",
    [
        (nn.BatchNorm2d(3), (2, 3, 4, 4)),
        (nn.BatchNorm1d(5), (4, 5)),
        (nn.BatchNorm1d(5, affine=False), (4, 5, 6)),
    ],
)
def test_affine_batch_norm_is_the_eval_mode_batch_norm(norm, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2.0)
    if norm.affine:
        nn.init.uniform_(norm.weight, 0.5, 1.5)
        nn.init.uniform_(norm.bias, -1, 1)
    norm.eval()
    model = nn.Sequential(norm)
    expected = model(x)
    with leakage_products._affine_norms(model):
        assert "forward" in vars(norm)
        swapped = model(x)
    assert "forward" not in vars(norm)  # the module comes back as it was
    assert torch.allclose(swapped, expected, atol=1e-6)
    norm.train()
    with leakage_products._affine_norms(model):
        assert "forward" not in vars(norm)  # a train-mode batch norm is left alone


@pytest.mark.parametrize("name", ["resnet18, batch 2", "mlp, custom loss", "timm vit (curvature)"])
def test_factored_stem_preconditioner_is_the_dense_one(name):
    with sdpa_kernel(SDPBackend.MATH):
        stem = products_for(name).stem_factors()
    factored, dense = StemPreconditioner(stem), GramPreconditioner(stem.dense())
    assert factored.ridge == pytest.approx(dense.ridge, rel=1e-6)
    rows = torch.randn(
        3, stem.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    expected = dense.solve(rows)
    assert float((factored.solve(rows) - expected).norm() / expected.norm()) <= 1e-6
    assert factored.trace_inverse() == pytest.approx(dense.trace_inverse(), rel=1e-6)
    triangular = StemPreconditioner(stem, explicit_limit=0)
    assert float((triangular.solve(rows) - expected).norm() / expected.norm()) <= 1e-6


def test_stem_without_an_observed_weight_falls_back_to_the_dense_preconditioner():
    torch.manual_seed(0)
    model = Dilated().eval()
    x, y = torch.rand(1, 2, 6, 6), torch.tensor([1])
    op = LeakageOperator(model, x, y, layers=["conv.bias", "head.weight"])
    solver = PreconditionedGramSolver.build(op, preconditioner="stem")
    assert isinstance(solver.preconditioner, GramPreconditioner)
    with pytest.raises(ValueError, match="weight block"):
        StemPreconditioner(GramProducts(model, x, y, observed=["conv.bias"]).stem_factors())


def test_auto_takes_the_stem_only_where_it_spans_the_input():
    with sdpa_kernel(SDPBackend.MATH):
        spanning = products_for("torchvision resnet18")  # 64 x 7 x 7 = 3,136 >= 16 x 16
        small = products_for("resnet18_cifar")  # 64 x 3 x 3 = 576 >= 8 x 8
        curvature = products_for("timm vit (curvature)")
    assert spanning.stem_factors().spans_input and chosen_stem(spanning) is not None
    assert small.stem_factors().spans_input  # at 8x8 even a 3x3 stem spans its 64 values
    assert curvature.stem_factors().spans_input and chosen_stem(curvature) is None
    assert chosen_stem(curvature, "stem") is not None
    torch.manual_seed(0)
    model = resnet18_cifar().eval()
    big = GramProducts(model, torch.rand(1, 3, 32, 32), torch.tensor([1]))
    assert not big.stem_factors().spans_input  # 576 < 1,024: the prefix instead
    assert not big.stem_can_span() and spanning.stem_can_span() and small.stem_can_span()
    assert chosen_stem(big) is None and chosen_stem(big, "stem") is not None
