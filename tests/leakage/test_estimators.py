import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lightning_privacy import defenses
from lightning_privacy.defenses.base import GradientTransform
from lightning_privacy.leakage import (
    calibrate_noise,
    defense_delta,
    estimate_leakage,
    i2f,
    i2f_lower_bound,
    split_gaussian_pipeline,
)

GaussianNoise = getattr(defenses, "GaussianNoise", None)
needs_noise = pytest.mark.skipif(GaussianNoise is None, reason="GaussianNoise not available")


@dataclass(frozen=True)
class Scale(GradientTransform):
    factor: float

    def __call__(self, gradients, *, generator=None):
        return [self.factor * g for g in gradients]


@dataclass(frozen=True)
class AddNoise(GradientTransform):
    std: float

    def __call__(self, gradients, *, generator=None):
        return [
            g + self.std * torch.randn(g.shape, generator=generator, dtype=g.dtype)
            for g in gradients
        ]


def net(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 24), nn.Sigmoid(), nn.Linear(24, 3)).double()
    for p in model.parameters():
        nn.init.uniform_(p, -0.5, 0.5)
    return model


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(4, 6, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 1, 2])


def test_defense_delta_is_defended_minus_original():
    grads = [torch.ones(3), torch.full((2,), 2.0)]
    delta = defense_delta([Scale(0.25)], grads)
    assert torch.equal(delta[0], torch.full((3,), -0.75)) and torch.equal(
        delta[1], torch.full((2,), -1.5)
    )
    assert torch.equal(grads[0], torch.ones(3))  # not mutated
    a = defense_delta([AddNoise(1.0)], grads, torch.Generator().manual_seed(4))
    b = defense_delta([AddNoise(1.0)], grads, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], torch.zeros(3))


def test_exact_estimate_matches_per_sample_i2f(data):
    model = net()
    x, y = data
    est = estimate_leakage(model, x, y, transforms=[Scale(0.9)], num_delta_samples=2)
    for i in range(len(x)):
        params = list(model.parameters())
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        delta = [-0.1 * g for g in grads]
        ref = i2f(model, x[i : i + 1], y[i : i + 1], delta).value[0]
        assert abs(float(est.per_sample_i2f[i]) - float(ref)) / float(ref) < 1e-8
        lb = i2f_lower_bound(model, x[i : i + 1], y[i : i + 1], delta)
        assert (
            abs(float(est.per_sample_lower_bound[i]) - float(lb.value[0])) / float(lb.value[0])
            < 1e-5
        )
        assert abs(float(est.lambda_max[i]) - lb.lambda_max) / lb.lambda_max < 1e-5
    # the lower bound is a lower bound
    assert (est.per_sample_lower_bound <= est.per_sample_i2f).all()
    psnr = 10 * torch.log10(6 / est.per_sample_i2f**2)
    assert torch.allclose(est.predicted_psnr, psnr)
    assert est.per_class_predicted_psnr[1] == pytest.approx(float(psnr[1:3].mean()))
    assert est.worst_class_predicted_psnr == max(est.per_class_predicted_psnr.values())
    assert est.worst_sample_predicted_psnr == float(psnr.max())
    metrics = est.metrics(per_class=True)
    assert {"leakage/i2f", "leakage/lambda_max", "leakage/predicted_psnr/class_2"} <= set(metrics)
    # δ = -0.1 g: ‖δ‖/‖g‖ is 0.1 for every example, past the validated 6 %
    assert torch.allclose(
        est.relative_perturbation, torch.full((len(x),), 0.1, dtype=torch.float64)
    )
    assert metrics["leakage/relative_perturbation"] == pytest.approx(0.1)
    assert est.beyond_validated_range
    small = estimate_leakage(model, x, y, transforms=[Scale(0.99)], num_delta_samples=1)
    assert not small.beyond_validated_range
    assert float(small.relative_perturbation.max()) == pytest.approx(0.01)


def test_defense_layers_restrict_delta(data):
    model = net()
    x, y = data
    full = estimate_leakage(model, x[:1], y[:1], transforms=[Scale(0.0)])
    part = estimate_leakage(model, x[:1], y[:1], transforms=[Scale(0.0)], defense_layers=r"^2\.")
    loss = nn.functional.cross_entropy(model(x[:1]), y[:1])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    delta = [torch.zeros_like(g) for g in grads[:2]] + [-g for g in grads[2:]]
    ref = i2f(model, x[:1], y[:1], delta).value[0]
    assert float(part.per_sample_i2f[0]) == pytest.approx(float(ref), rel=1e-8)
    assert float(full.per_sample_i2f[0]) != pytest.approx(float(ref), rel=1e-3)


@needs_noise
def test_expected_estimator_matches_monte_carlo(data):
    model = net()
    x, y = data
    pipeline = [GaussianNoise(std=1e-3)]
    expected = estimate_leakage(model, x[:2], y[:2], transforms=pipeline, estimator="expected")
    exact = estimate_leakage(
        model,
        x[:2],
        y[:2],
        transforms=pipeline,
        num_delta_samples=300,
        generator=torch.Generator().manual_seed(0),
    )
    # mean of I2F over draws vs its root-mean-square: within 10 % (Jensen, sampling)
    ratio = exact.per_sample_i2f / expected.per_sample_i2f
    assert ((ratio > 0.85) & (ratio <= 1.02)).all(), ratio
    # the closed-form E‖δ‖² against the draws' root-mean-square ‖δ‖
    assert torch.allclose(expected.relative_perturbation, exact.relative_perturbation, rtol=0.02), (
        expected.relative_perturbation,
        exact.relative_perturbation,
    )


@needs_noise
def test_split_gaussian_pipeline():
    clip = getattr(defenses, "GradientClipping", None)
    assert split_gaussian_pipeline([GaussianNoise(std=0.5)]) == ([], 0.5)
    if clip is not None:
        before, std = split_gaussian_pipeline([clip(max_norm=1.0), GaussianNoise(std=0.5)])
        assert len(before) == 1 and std == 0.5
    with pytest.raises(ValueError, match="estimator='exact'"):
        split_gaussian_pipeline([GaussianNoise(std=0.5), Scale(2.0)])
    with pytest.raises(ValueError, match="estimator='exact'"):
        split_gaussian_pipeline([AddNoise(1.0), GaussianNoise(std=0.5)])


def test_calibrate_noise_hits_target(data):
    model = net()
    x, y = data
    target = 25.0
    cal = calibrate_noise(model, (x, y), target_psnr=target, rel_tol=1e-6)
    assert cal.predicted_psnr <= target < cal.predicted_psnr + 1e-3
    assert float(cal.per_sample_predicted_psnr.max()) == pytest.approx(cal.predicted_psnr)
    # closed form for the worst sample: std = sqrt(n 10^(-P/10) / tr)
    from lightning_privacy.functional.leakage import GramFactorization, LeakageOperator

    traces = [
        GramFactorization(LeakageOperator(model, x[i : i + 1], y[i : i + 1]).gram()).trace_inverse()
        for i in range(4)
    ]
    closed = math.sqrt(6 * 10 ** (-target / 10) / min(traces))
    assert cal.std == pytest.approx(closed, rel=1e-4)
    mean = calibrate_noise(model, (x, y), target_psnr=target, reduction="mean")
    assert mean.std < cal.std
    # clipping-like deterministic bias already enough -> zero noise
    assert calibrate_noise(model, (x, y), target_psnr=target, before=[Scale(0.0)]).std == 0.0
    with pytest.raises(ValueError, match="std_high"):
        calibrate_noise(model, (x, y), target_psnr=-200.0, std_high=1e-3)


def test_bad_arguments(data):
    model = net()
    x, y = data
    with pytest.raises(ValueError, match="estimator"):
        estimate_leakage(model, x, y, transforms=[], estimator="exactly")
    with pytest.raises(ValueError, match="damping"):
        estimate_leakage(model, x, y, transforms=[], damping=-0.1)
    with pytest.raises(ValueError, match="same non-zero batch size"):
        estimate_leakage(model, x, y[:2], transforms=[])
    with pytest.raises(ValueError, match="num_delta_samples"):
        estimate_leakage(model, x, y, transforms=[], num_delta_samples=0)
    with pytest.raises(ValueError, match="finite"):
        estimate_leakage(model, x[:1], y[:1], transforms=[Scale(float("inf"))])
    with pytest.raises(ValueError, match="GaussianNoise"):
        estimate_leakage(model, x, y, transforms=[Scale(0.5)], estimator="expected")
    with pytest.raises(TypeError, match="batch"):
        calibrate_noise(model, x, target_psnr=20.0)


def test_matrix_free_path_matches_dense(data):
    model = net()
    x, y = data
    kwargs = dict(transforms=[Scale(0.95)], num_delta_samples=1)
    dense = estimate_leakage(model, x[:2], y[:2], **kwargs)
    cg = estimate_leakage(model, x[:2], y[:2], method="cg", **kwargs)
    assert torch.allclose(cg.per_sample_i2f, dense.per_sample_i2f, rtol=1e-4)
    assert torch.allclose(cg.lambda_max, dense.lambda_max, rtol=1e-5)
    auto = estimate_leakage(model, x[:2], y[:2], dense_limit=0, **kwargs)
    assert torch.allclose(auto.per_sample_i2f, dense.per_sample_i2f, rtol=1e-4)


@needs_noise
def test_matrix_free_expected_uses_hutchinson(data):
    model = net()
    x, y = data
    kwargs = dict(transforms=[GaussianNoise(std=1e-3)], estimator="expected")
    dense = estimate_leakage(model, x[:1], y[:1], **kwargs)
    cg = estimate_leakage(
        model,
        x[:1],
        y[:1],
        method="cg",
        num_delta_samples=100,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    ratio = float(cg.per_sample_i2f[0] / dense.per_sample_i2f[0])
    assert 0.8 < ratio < 1.2
    assert 0.8 < float(cg.per_sample_lower_bound[0] / dense.per_sample_lower_bound[0]) < 1.2
