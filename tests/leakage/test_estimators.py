import math
from dataclasses import dataclass

import pytest
import torch
from helpers import SIGMOID_MLP, BoringModel, fit, loader, random_tensors
from torch import nn

from lightning_privacy import defenses
from lightning_privacy._validation import check_choice
from lightning_privacy.callbacks import GradientDefense, LeakageMonitor
from lightning_privacy.defenses.base import GradientTransform
from lightning_privacy.functional.leakage import LanczosResult, LeakageOperator
from lightning_privacy.leakage import (
    ESTIMATORS,
    EstimationContext,
    LeakageEstimate,
    LeakageEstimator,
    SampleEstimate,
    calibrate_noise,
    create_estimator,
    defense_delta,
    estimate_leakage,
    i2f,
    i2f_lower_bound,
    list_estimators,
    mean_square_norm,
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


def test_registry_of_estimators():
    names = ["approximate", "exact", "expected", "lower_bound"]
    assert list_estimators() == names == list(ESTIMATORS)
    assert "exact" in ESTIMATORS and "exactly" not in ESTIMATORS and len(ESTIMATORS) == 4
    assert check_choice("estimator", "expected", ESTIMATORS) == "expected"
    for name in list_estimators():
        assert isinstance(create_estimator(name), LeakageEstimator)
    with pytest.raises(ValueError, match="Did you mean 'lower_bound'"):
        create_estimator("lowerbound")
    create_estimator("exact").check_defense([Scale(0.5)])  # any pipeline
    with pytest.raises(ValueError, match="GaussianNoise"):
        create_estimator("expected").check_defense([Scale(0.5)])


def test_leakage_estimate_is_assembled_from_sample_estimates():
    runs = [LanczosResult(4.0, 3, True, 0.0), LanczosResult(2.0, 5, False, 1e-3)]
    samples = [
        SampleEstimate(0.1, 0.01, runs[0], 0.05, 30.0),
        SampleEstimate(0.3, 0.02, runs[1], 0.07, 20.0),
    ]
    est = LeakageEstimate.from_samples("exact", samples, torch.tensor([[1], [0]]))
    assert torch.equal(est.per_sample_i2f, torch.tensor([0.1, 0.3], dtype=torch.float64))
    assert torch.equal(est.lambda_max, torch.tensor([4.0, 2.0], dtype=torch.float64))
    assert torch.equal(est.targets, torch.tensor([1, 0]))
    assert est.per_class_predicted_psnr == {0: 20.0, 1: 30.0} and est.lanczos == tuple(runs)
    assert est.beyond_validated_range and est.metrics()["leakage/i2f_lower_bound"] == 0.015


def test_context_draws_delta_only_on_defended_parameters(data):
    model = net()
    x, y = data
    op = LeakageOperator(model, x[:1], y[:1])
    context = EstimationContext(transforms=[Scale(0.0)], defended=(2, 3), num_delta_samples=2)
    deltas = context.draw_deltas(op)
    a = op.numels[0] + op.numels[1]
    assert deltas.shape == (2, op.param_dim) and context.defended_size(op) == op.param_dim - a
    assert torch.equal(deltas[:, :a], torch.zeros(2, a, dtype=deltas.dtype))
    assert torch.equal(deltas[0, a:], -op.gradient[a:])
    assert mean_square_norm(deltas) == pytest.approx(float(op.gradient[a:].norm() ** 2))


def test_lower_bound_never_assembles_the_gram_matrix(data, monkeypatch):
    model = net()
    x, y = data

    def no_gram(self, **kwargs):
        raise AssertionError("lower_bound assembled J Jᵀ")

    dense = estimate_leakage(model, x[:2], y[:2], transforms=[Scale(0.9)], estimator="lower_bound")
    monkeypatch.setattr(LeakageOperator, "gram", no_gram)
    for method in ("dense", "cg", "auto"):
        est = estimate_leakage(
            model, x[:2], y[:2], transforms=[Scale(0.9)], estimator="lower_bound", method=method
        )
        assert torch.equal(est.per_sample_i2f, dense.per_sample_i2f)
        assert torch.equal(est.per_sample_i2f, est.per_sample_lower_bound)


@needs_noise
@pytest.mark.parametrize("name", list_estimators())
def test_every_registered_estimator_runs_through_estimate_leakage(data, name):
    """Through estimate_leakage on a tiny MLP with Gaussian noise (which every built-in accepts):
    finite per-sample values, reproducible from the generator, the global stream untouched."""
    assert isinstance(create_estimator(name), LeakageEstimator)
    assert isinstance(ESTIMATORS.get(name)(), LeakageEstimator)
    model = net()
    x, y = data
    pipeline = [GaussianNoise(std=1e-3)]
    create_estimator(name).check_defense(pipeline)
    state = torch.get_rng_state()

    def run():
        return estimate_leakage(
            model,
            x,
            y,
            transforms=pipeline,
            estimator=name,
            num_delta_samples=2,
            generator=torch.Generator().manual_seed(0),
        )

    est, again = run(), run()
    assert torch.equal(torch.get_rng_state(), state)
    assert est.estimator == name
    per_sample = {
        "per_sample_i2f": est.per_sample_i2f,
        "per_sample_lower_bound": est.per_sample_lower_bound,
        "lambda_max": est.lambda_max,
        "predicted_psnr": est.predicted_psnr,
        "relative_perturbation": est.relative_perturbation,
    }
    for key, values in per_sample.items():
        assert values.shape == (len(x),) and torch.isfinite(values).all(), key
    assert (est.per_sample_i2f > 0).all() and math.isfinite(est.i2f)
    assert torch.equal(est.per_sample_i2f, again.per_sample_i2f)


@dataclass(frozen=True)
class WorstDraw(LeakageEstimator):
    """The largest I2F over the draws: a pessimistic "exact", registered from this file alone."""

    def check_defense(self, transforms):
        if not transforms:
            raise ValueError(
                "Expected `transforms` to hold a defense for estimator='worst_draw', but got []."
            )

    def estimate(self, op, context):
        solver = context.gram_solver(op)
        lanczos = solver.lanczos()
        deltas = context.draw_deltas(op)
        jdelta = op.jdelta_rows(deltas)
        return context.sample_estimate(
            op,
            i2f=float(solver.solve_norms(jdelta).max()),
            lower_bound=float(jdelta.norm(dim=-1).max() / lanczos.value),
            lanczos=lanczos,
            delta_sq_norm=mean_square_norm(deltas),
        )


@pytest.fixture
def worst_draw():
    ESTIMATORS.register("worst_draw")(WorstDraw)
    yield "worst_draw"
    del ESTIMATORS._entries["worst_draw"]


def test_new_estimator_runs_in_estimate_leakage(data, worst_draw):
    model = net()
    x, y = data
    pipeline = [AddNoise(1e-3)]

    def run(estimator, draws):
        gen = torch.Generator().manual_seed(0)
        return estimate_leakage(
            model,
            x,
            y,
            transforms=pipeline,
            estimator=estimator,
            num_delta_samples=draws,
            generator=gen,
        )

    worst, exact = run(worst_draw, 5), run("exact", 5)
    assert worst.estimator == "worst_draw" and worst.per_sample_i2f.shape == (4,)
    assert (worst.per_sample_i2f > exact.per_sample_i2f).all()  # same draws: max > mean
    assert torch.equal(worst.relative_perturbation, exact.relative_perturbation)
    assert torch.equal(worst.lambda_max, exact.lambda_max)
    single = run(worst_draw, 1)  # one draw: the max is the mean
    assert torch.equal(single.per_sample_i2f, run("exact", 1).per_sample_i2f)
    with pytest.raises(ValueError, match="estimator='worst_draw'"):
        estimate_leakage(model, x, y, transforms=[], estimator=worst_draw)


@needs_noise
def test_new_estimator_runs_in_leakage_monitor(worst_draw, fast_trainer_kwargs):
    x, y = random_tensors(20, (1, 4, 4), num_classes=3)
    module = BoringModel(**dict(SIGMOID_MLP, width=8, batch_norm=False, dropout=0.0))
    monitor = LeakageMonitor(
        estimator=worst_draw, every_n_train_steps=2, batch=(x[16:], y[16:]), num_samples=2
    )
    callbacks = [GradientDefense([GaussianNoise(std=1e-3)]), monitor]
    trainer, _ = fit(fast_trainer_kwargs, callbacks, module, loader(x[:16], y[:16]), max_steps=2)
    assert monitor.last is not None and monitor.last.estimator == "worst_draw"
    assert len(monitor.history) == 1 and monitor.last.per_sample_i2f.shape == (2,)
    assert torch.isfinite(trainer.callback_metrics["leakage/i2f"])
    assert float(trainer.callback_metrics["leakage/i2f"]) > 0


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh])
def test_approximate_errs_low_by_at_most_a_few_per_cent_of_exact(activation):
    """The default ``tol`` keeps the stated error model: at most a few per cent, and low."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        activation(),
        nn.Conv2d(6, 6, 3, stride=2),
        activation(),
        nn.Flatten(),
        nn.Linear(54, 3),
    ).eval()
    x, y = torch.randn(3, 2, 8, 8), torch.tensor([0, 1, 2])
    noise = [defenses.GaussianNoise(std=1e-3)]
    runs = {
        name: estimate_leakage(
            model,
            x,
            y,
            transforms=noise,
            estimator=name,
            method="dense",
            generator=torch.Generator().manual_seed(3),
        ).per_sample_i2f
        for name in ("exact", "approximate")
    }
    ratio = runs["approximate"] / runs["exact"]
    assert bool((ratio > 0.95).all()) and bool((ratio < 1.0 + 1e-4).all()), ratio


class _PrecisionProbe(nn.Module):
    """A small conv net that records the precision settings each forward pass runs under."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3), nn.Linear(4 * 4 * 4, 2)
        self.seen = set()

    def forward(self, x):
        self.seen.add(
            (
                torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision(),
                torch.is_autocast_enabled("cpu"),
            )
        )
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("estimator", ["exact", "approximate"])
def test_measurement_runs_in_full_precision_and_restores_the_user_s_settings(estimator):
    torch.manual_seed(0)
    model = _PrecisionProbe()
    x, y = torch.rand(2, 1, 6, 6), torch.tensor([0, 1])
    before = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")  # what a speed-minded training script sets
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a hook called under AMP
            est = estimate_leakage(model, x, y, transforms=[Scale(0.01)], estimator=estimator)
        after = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    finally:
        torch.backends.cudnn.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])
    assert model.seen == {(False, "highest", False)}
    assert after == (True, "high")
    assert est.i2f > 0
