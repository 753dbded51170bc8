import warnings

import helpers
import pytest
import torch
from helpers import SIGMOID_MLP, BoringModel, loader, random_tensors

from lightning_privacy.callbacks import GradientDefense, LeakageMonitor
from lightning_privacy.defenses import GaussianNoise, MagnitudePruning
from lightning_privacy.leakage import estimate_leakage


@pytest.fixture(scope="module")
def data():
    return random_tensors(48, (1, 4, 4), num_classes=3)


def loaders(data):
    x, y = data
    return loader(x[:32], y[:32]), loader(x[32:], y[32:])


def fit(data, callbacks, kwargs, max_steps=4, **extra):
    """``max_steps`` steps of the SIGMOID_MLP module on 32 examples, one validation batch."""
    overrides = {"max_steps": max_steps, "limit_val_batches": 1, **extra}
    return helpers.fit(kwargs, callbacks, BoringModel(**SIGMOID_MLP), *loaders(data), **overrides)


def test_never_changes_the_trajectory(data, fast_trainer_kwargs):
    torch.manual_seed(123)
    _, plain = fit(data, [GradientDefense([GaussianNoise(std=1e-3)], seed=1)], fast_trainer_kwargs)
    torch.manual_seed(123)
    monitor = LeakageMonitor(every_n_train_steps=1, num_samples=2, num_delta_samples=2)
    _, watched = fit(
        data, [GradientDefense([GaussianNoise(std=1e-3)], seed=1), monitor], fast_trainer_kwargs
    )
    assert len(monitor.history) == 4
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), watched.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert watched.training  # train/eval mode restored


def test_logs_keys_and_matches_direct_estimate(data, fast_trainer_kwargs):
    x, y = data
    batch = (x[40:44], y[40:44])
    pipeline = [GaussianNoise(std=1e-3)]
    monitor = LeakageMonitor(
        every_n_train_steps=4, batch=batch, per_class=True, num_delta_samples=3, seed=7
    )
    trainer, module = fit(data, [GradientDefense(pipeline, seed=1), monitor], fast_trainer_kwargs)
    metrics = trainer.callback_metrics
    for key in (
        "leakage/i2f",
        "leakage/i2f_lower_bound",
        "leakage/lambda_max",
        "leakage/predicted_psnr",
        "leakage/worst_class_predicted_psnr",
        "leakage/worst_sample_predicted_psnr",
    ):
        assert torch.isfinite(metrics[key]), key
    classes = sorted(k for k in metrics if k.startswith("leakage/predicted_psnr/class_"))
    assert len(classes) == len(torch.unique(y[40:44]))
    # one evaluation (step 4, fresh generator) equals a direct estimate on the final weights
    assert [h["step"] for h in monitor.history] == [4.0]
    module.eval()
    direct = estimate_leakage(
        module,
        *batch,
        transforms=pipeline,
        num_delta_samples=3,
        generator=torch.Generator().manual_seed(7),
    )
    module.train()
    assert monitor.history[0]["leakage/i2f"] == pytest.approx(direct.i2f, rel=1e-6)
    assert float(metrics["leakage/lambda_max"]) == pytest.approx(
        float(direct.lambda_max.mean()), rel=1e-5
    )
    assert metrics["leakage/worst_class_predicted_psnr"] >= metrics["leakage/predicted_psnr"] - 1e-4
    assert metrics["leakage/i2f_lower_bound"] <= metrics["leakage/i2f"]


def test_expected_estimator_and_epoch_schedule(data, fast_trainer_kwargs):
    monitor = LeakageMonitor(estimator="expected", num_samples=2)
    trainer, _ = fit(
        data,
        [GradientDefense([GaussianNoise(std=1e-2)]), monitor],
        fast_trainer_kwargs,
        max_steps=8,
    )
    assert len(monitor.history) == 2  # 4 batches per epoch, 2 epochs
    assert monitor.last is not None and monitor.last.estimator == "expected"
    assert float(trainer.callback_metrics["leakage/i2f"]) > 0


def test_threshold_stops_or_warns(data, fast_trainer_kwargs):
    stop = LeakageMonitor(
        every_n_train_steps=2, max_predicted_psnr=-1e3, on_exceed="stop", num_samples=1
    )
    trainer, _ = fit(
        data,
        [GradientDefense([MagnitudePruning(ratio=0.5)]), stop],
        fast_trainer_kwargs,
        max_steps=8,
    )
    assert trainer.global_step == 2 and len(stop.history) == 1
    warn = LeakageMonitor(every_n_train_steps=2, max_predicted_psnr=-1e3, num_samples=1)
    with pytest.warns(UserWarning, match="exceeds max_predicted_psnr"):
        trainer, _ = fit(
            data, [GradientDefense([GaussianNoise(std=1e-2)]), warn], fast_trainer_kwargs
        )
    assert trainer.global_step == 4
    calm = LeakageMonitor(
        every_n_train_steps=2, max_predicted_psnr=1e4, on_exceed="stop", num_samples=1
    )
    trainer, _ = fit(data, [GradientDefense([GaussianNoise(std=1e-2)]), calm], fast_trainer_kwargs)
    assert trainer.global_step == 4


def test_warns_once_past_the_validated_range(data, fast_trainer_kwargs):
    big = LeakageMonitor(every_n_train_steps=1, num_samples=2)
    with pytest.warns(UserWarning, match=r"past the 6% up to which the I2F was checked") as seen:
        fit(data, [GradientDefense([MagnitudePruning(ratio=0.5)]), big], fast_trainer_kwargs)
    assert sum("past the 6%" in str(w.message) for w in seen) == 1  # once, not every step
    assert len(big.history) == 4
    assert all(h["leakage/relative_perturbation"] > 0.06 for h in big.history)
    small = LeakageMonitor(every_n_train_steps=1, num_samples=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past the 6%.*")
        fit(data, [GradientDefense([GaussianNoise(std=1e-6)]), small], fast_trainer_kwargs)
    assert all(h["leakage/relative_perturbation"] < 0.06 for h in small.history)


def test_state_in_checkpoint(data, fast_trainer_kwargs, tmp_path):
    monitor = LeakageMonitor(every_n_train_steps=2, num_samples=1, seed=3)
    trainer, _ = fit(
        data, [GradientDefense([GaussianNoise(std=1e-2)]), monitor], fast_trainer_kwargs
    )
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "LeakageMonitor" in k]
    fresh = LeakageMonitor(every_n_train_steps=2, num_samples=1, seed=3)
    fresh.load_state_dict(state)
    assert fresh.history == monitor.history and fresh._last_step == 4
    assert torch.equal(
        torch.randn(5, generator=fresh.generator), torch.randn(5, generator=monitor.generator)
    )


def test_bad_configuration(data, fast_trainer_kwargs):
    with pytest.raises(ValueError, match="at most one"):
        LeakageMonitor(every_n_train_steps=1, every_n_epochs=1)
    with pytest.raises(ValueError, match="estimator"):
        LeakageMonitor(estimator="lowerbound")
    with pytest.raises(ValueError, match="num_delta_samples"):
        LeakageMonitor(num_delta_samples=0)
    with pytest.raises(ValueError, match="on_exceed"):
        LeakageMonitor(on_exceed="stopp")
    with pytest.raises(TypeError, match="inputs, targets"):
        LeakageMonitor(batch=torch.zeros(3))
    with pytest.raises(ValueError, match="GaussianNoise"):
        fit(
            data,
            [GradientDefense([MagnitudePruning(ratio=0.5)]), LeakageMonitor(estimator="expected")],
            fast_trainer_kwargs,
        )
    train, _ = loaders(data)
    with pytest.raises(ValueError, match="held-out batch"):
        helpers.fit(
            fast_trainer_kwargs, [LeakageMonitor()], BoringModel(**SIGMOID_MLP), train, max_steps=1
        )
