"""Single-process GradientDefense: real Trainer runs on a tiny model."""

from __future__ import annotations

import logging
import math
import threading
import warnings
from types import SimpleNamespace

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import PLAIN_MLP, BoringModel, Recorder, loader, random_tensors
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_privacy.callbacks import GradientDefense
from lightning_privacy.callbacks._noise_ahead import NoiseAhead
from lightning_privacy.defenses import (
    DEFENSES,
    GaussianNoise,
    GradientClipping,
    GradientTransform,
    LaplaceNoise,
    MagnitudePruning,
    RandomPruning,
    apply_transforms,
    create_defense,
)
from lightning_privacy.functional import global_norm, parameter_gradients
from lightning_privacy.functional.seeding import derive_seed

TINY = dict(PLAIN_MLP, input_shape=(12,), width=10, num_classes=3)


def train_loader():
    return loader(*random_tensors(32, (12,), num_classes=3, seed=1, normal=True), batch_size=8)


def fit(kw, callbacks, module=None, **trainer_kw):
    """One step (unless ``max_steps`` says otherwise) of ``module`` (default: TINY's)."""
    module = BoringModel(**TINY) if module is None else module
    return helpers.fit(kw, callbacks, module, train_loader(), **{"max_steps": 1, **trainer_kw})


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_std_zero_is_bitwise_identical(fast_trainer_kwargs):
    _, plain = fit(fast_trainer_kwargs, [], max_steps=4)
    _, zero = fit(fast_trainer_kwargs, [GradientDefense(GaussianNoise(std=0.0))], max_steps=4)
    for (n, a), b in zip(params(plain).items(), params(zero).values(), strict=True):
        assert torch.equal(a, b), n
    _, noisy = fit(fast_trainer_kwargs, [GradientDefense(GaussianNoise(std=0.1))], max_steps=4)
    assert not torch.equal(params(plain)["net.0.weight"], params(noisy)["net.0.weight"])


# one setting per registered defense: every one runs alone in a real fit (a new one needs a row)
SETTINGS = {
    "gaussian_noise": dict(std=0.05),
    "gradient_clipping": dict(max_norm=0.1),
    "laplace_noise": dict(scale=0.05),
    "low_rank": dict(rank=1),
    "magnitude_pruning": dict(ratio=0.7),
    "random_pruning": dict(ratio=0.5),
}


def _each_registered_defense():
    missing = [name for name in DEFENSES if name not in SETTINGS]
    if missing:
        raise LookupError(f"Add a setting to SETTINGS for the registered defense(s) {missing}.")
    return [[create_defense(name, **SETTINGS[name])] for name in DEFENSES]


PIPELINES = [
    *_each_registered_defense(),
    [MagnitudePruning(ratio=0.7, scope="global")],
    [GradientClipping(max_norm=0.1), GaussianNoise(std=0.01)],
]


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: "+".join(type(t).__name__ for t in p))
def test_sgd_update_is_minus_defended_gradient(fast_trainer_kwargs, pipeline):
    pre, post = Recorder(), Recorder()
    defense = GradientDefense(pipeline, seed=7)
    fit(fast_trainer_kwargs, [pre, defense, post])
    names = list(pre.grads[0])
    original = [pre.grads[0][n] for n in names]
    gen = torch.Generator().manual_seed(derive_seed(7, 0, 0))
    expected = apply_transforms(pipeline, original, generator=gen)
    for n, e in zip(names, expected, strict=True):
        defended = post.grads[0][n]
        assert torch.equal(defended, e), n  # exactly the pipeline on the original gradient
        update = post.after[0][n] - post.before[0][n]
        torch.testing.assert_close(update, -defended, rtol=0, atol=1e-6)
        assert torch.equal(update == 0, defended == 0), n  # zeros of the update = pruned entries
    if isinstance(pipeline[0], MagnitudePruning) and pipeline[0].scope == "per_tensor":
        for n in names:
            update = post.after[0][n] - post.before[0][n]
            assert (update == 0).sum().item() == math.floor(0.7 * update.numel()), n
    if pipeline == [GradientClipping(max_norm=0.1)]:
        assert global_norm(original).item() > 0.1
        assert global_norm([post.grads[0][n] for n in names]).item() <= 0.1 + 1e-6


def test_logged_statistics(fast_trainer_kwargs):
    pre, post = Recorder(), Recorder()
    trainer, _ = fit(fast_trainer_kwargs, [pre, GradientDefense(MagnitudePruning(ratio=0.5)), post])
    names = list(pre.grads[0])
    original = [pre.grads[0][n] for n in names]
    defended = [post.grads[0][n] for n in names]
    metrics = trainer.callback_metrics
    assert metrics["defense/grad_norm"].item() == pytest.approx(global_norm(original).item())
    delta = [d - o for d, o in zip(defended, original, strict=True)]
    assert metrics["defense/perturbation_norm"].item() == pytest.approx(global_norm(delta).item())
    total = sum(d.numel() for d in defended)
    zeros = sum((d == 0).sum().item() for d in defended)
    assert metrics["defense/sparsity"].item() == pytest.approx(zeros / total)
    assert 0.45 < zeros / total < 0.55
    trainer, _ = fit(fast_trainer_kwargs, [GradientDefense(GaussianNoise(std=0.1))])
    assert "defense/sparsity" not in trainer.callback_metrics
    assert trainer.callback_metrics["defense/perturbation_norm"] > 0


class CountingTransform(GradientTransform):
    """Counts calls and keeps what it was given."""

    def __init__(self):
        self.seen = []

    def __call__(self, gradients, *, generator=None):
        self.seen.append([g.clone() for g in gradients])
        return list(gradients)


def test_accumulation_defends_once_per_step(fast_trainer_kwargs):
    counter = CountingTransform()
    module = BoringModel(**TINY)
    init = params(module)
    fit(
        fast_trainer_kwargs,
        [GradientDefense(counter)],
        module=module,
        max_steps=2,
        accumulate_grad_batches=2,
    )
    assert len(counter.seen) == 2  # 4 micro-batches, 2 optimizer steps
    # the first call sees the accumulated (mean over the 2 micro-batches) gradient
    fresh = BoringModel(**TINY)
    fresh.load_state_dict({k: v for k, v in init.items()})
    batches = list(train_loader())
    grads = [parameter_gradients(fresh, x, y, loss_fn=F.cross_entropy) for x, y in batches[:2]]
    for i, name in enumerate(init):
        expected = (grads[0][name] + grads[1][name]) / 2
        torch.testing.assert_close(counter.seen[0][i], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-scaler"])
def test_mixed_precision(fast_trainer_kwargs, precision):
    kw = dict(fast_trainer_kwargs)
    if precision == "fp16-scaler":
        # On CPU Lightning turns "16-mixed" into bf16; force a real GradScaler as research note E2.
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        kw["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    else:
        kw["precision"] = precision
    kw.pop("deterministic")
    pre, post = Recorder(), Recorder()
    clip = 0.05
    defense = GradientDefense([GradientClipping(max_norm=clip), GaussianNoise(std=0.0)])
    trainer, _ = fit(kw, [pre, defense, post], max_steps=2)
    names = list(pre.grads[0])
    for step in range(2):
        original = [pre.grads[step][n] for n in names]
        defended = [post.grads[step][n] for n in names]
        # gradients are unscaled here: true norm well above the clip, defended norm == clip
        assert 0.2 < global_norm(original).item() < 50
        assert global_norm(defended).item() == pytest.approx(clip, rel=1e-4)
        for n, d in zip(names, defended, strict=True):
            update = post.after[step][n] - post.before[step][n]
            torch.testing.assert_close(update, -d, rtol=0, atol=1e-6)
    assert trainer.callback_metrics["defense/grad_norm"].item() > clip


def test_layers_restricts_defense(fast_trainer_kwargs):
    _, plain = fit(fast_trainer_kwargs, [])
    defense = GradientDefense(GaussianNoise(std=0.5), layers=r"^net\.2\.")
    _, defended = fit(fast_trainer_kwargs, [defense])
    a, b = params(plain), params(defended)
    assert torch.equal(a["net.0.weight"], b["net.0.weight"])
    assert torch.equal(a["net.0.bias"], b["net.0.bias"])
    assert not torch.equal(a["net.2.weight"], b["net.2.weight"])
    assert not torch.equal(a["net.2.bias"], b["net.2.bias"])
    _, listed = fit(
        fast_trainer_kwargs,
        [GradientDefense(GaussianNoise(std=0.5), layers=["net.0.bias", "net.2.bias"])],
    )
    c = params(listed)
    assert torch.equal(a["net.0.weight"], c["net.0.weight"])
    assert not torch.equal(a["net.0.bias"], c["net.0.bias"])


def test_manual_optimization_supported(fast_trainer_kwargs):
    pre, post = Recorder(), Recorder()
    fit(
        fast_trainer_kwargs,
        [pre, GradientDefense(MagnitudePruning(ratio=0.5)), post],
        module=BoringModel(**TINY, manual=True),
    )
    for n, g in pre.grads[0].items():
        d = post.grads[0][n]
        assert (d == 0).sum().item() == math.floor(0.5 * d.numel())
        assert not torch.equal(g, d)
        torch.testing.assert_close(post.after[0][n] - post.before[0][n], -d, rtol=0, atol=1e-6)


def test_resume_continues_the_random_stream(fast_trainer_kwargs, tmp_path):
    kw = {**fast_trainer_kwargs, "limit_train_batches": 2}
    first = GradientDefense(GaussianNoise(std=0.1))  # seed drawn at setup, stored in checkpoint
    trainer, _ = fit(kw, [first], max_steps=-1, max_epochs=2)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    seed = first.state_dict()["seed"]
    _, resumed = fit(
        kw, [GradientDefense(GaussianNoise(std=0.1))], max_steps=-1, max_epochs=4, ckpt_path=ckpt
    )
    _, straight = fit(
        kw, [GradientDefense(GaussianNoise(std=0.1), seed=seed)], max_steps=-1, max_epochs=4
    )
    _, other = fit(
        kw, [GradientDefense(GaussianNoise(std=0.1), seed=seed + 1)], max_steps=-1, max_epochs=4
    )
    for n, p in params(straight).items():
        assert torch.equal(p, params(resumed)[n]), n
    assert not torch.equal(params(straight)["net.0.weight"], params(other)["net.0.weight"])


def test_gradient_clip_val_warns(fast_trainer_kwargs):
    with pytest.warns(UserWarning, match="gradient_clip_val"):
        fit(fast_trainer_kwargs, [GradientDefense(GaussianNoise(std=0.1))], gradient_clip_val=1.0)


def test_formal_pipeline_logs_epsilon_and_stops(fast_trainer_kwargs):
    from lightning_privacy.accountants import BatchClippingAccountant

    kw = {**fast_trainer_kwargs, "limit_train_batches": 2}
    pipeline = [GradientClipping(max_norm=1.0), GaussianNoise(std=4.0)]
    defense = GradientDefense(pipeline, seed=0)
    trainer, _ = fit(kw, [defense], max_steps=-1, max_epochs=3)
    ref = BatchClippingAccountant(max_grad_norm=1.0, std=4.0)
    ref.step(epochs=3)
    delta = 1 / (10 * 32)
    assert trainer.callback_metrics["privacy/delta"].item() == pytest.approx(delta)
    assert trainer.callback_metrics["privacy/epsilon"].item() == pytest.approx(
        ref.get_epsilon(delta), rel=1e-6
    )
    # the budget allows exactly 2 epochs: training stops after epoch 2 without exceeding it
    two = BatchClippingAccountant(max_grad_norm=1.0, std=4.0)
    two.step(epochs=2)
    budget = (two.get_epsilon(1e-3) + ref.get_epsilon(1e-3)) / 2
    capped = GradientDefense(pipeline, seed=0, max_epsilon=budget, target_delta=1e-3)
    trainer, _ = fit(kw, [capped], max_steps=-1, max_epochs=10)
    assert trainer.current_epoch == 2
    assert trainer.callback_metrics["privacy/epsilon"].item() == pytest.approx(
        two.get_epsilon(1e-3), rel=1e-6
    )
    # the accountant history is in the checkpoint state
    assert capped.state_dict()["accountant"]["accountant"]


def test_informal_pipeline_logs_no_epsilon(fast_trainer_kwargs, caplog):
    with caplog.at_level(logging.INFO):
        trainer, _ = fit(fast_trainer_kwargs, [GradientDefense(GaussianNoise(std=0.1))])
    assert "privacy/epsilon" not in trainer.callback_metrics
    said = [
        r.getMessage() for r in caplog.records if "no formal privacy guarantee" in r.getMessage()
    ]
    assert len(said) == 1  # said once, not per step


@pytest.mark.parametrize(
    ("build", "exc", "match"),
    [
        (lambda: GradientDefense(GaussianNoise), TypeError, "transforms"),
        (lambda: GradientDefense("gaussian_noise"), TypeError, "transforms"),
        (lambda: GradientDefense([]), ValueError, "at least one"),
        (lambda: GradientDefense([GaussianNoise(std=0.1), 3]), TypeError, r"transforms\[1\]"),
        (
            lambda: GradientDefense(GaussianNoise(std=0.1), placement="before"),
            ValueError,
            "placement",
        ),
        (lambda: GradientDefense(GaussianNoise(std=0.1), seed=-1), ValueError, "seed"),
        (lambda: GradientDefense(GaussianNoise(std=0.1), layers=3), TypeError, "layers"),
        (lambda: GradientDefense(GaussianNoise(std=0.1), layers="(("), ValueError, "regex"),
        (
            lambda: GradientDefense(GaussianNoise(std=0.1), max_epsilon=1.0),
            ValueError,
            "computable epsilon",
        ),
        (
            lambda: GradientDefense(
                [GradientClipping(max_norm=1.0), GaussianNoise(std=1.0)],
                layers="net",
                max_epsilon=1.0,
            ),
            ValueError,
            "computable epsilon",
        ),
        (
            lambda: GradientDefense(
                [GradientClipping(max_norm=1.0), GaussianNoise(std=1.0)], max_epsilon=-1.0
            ),
            ValueError,
            "max_epsilon",
        ),
        (
            lambda: GradientDefense(GaussianNoise(std=0.1), target_delta=1.0),
            ValueError,
            "target_delta",
        ),
    ],
)
def test_bad_arguments(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_layers_matching_nothing_fails_before_training(fast_trainer_kwargs):
    module = BoringModel(**TINY)
    before = params(module)
    with pytest.raises(ValueError, match="matched none"):
        fit(
            fast_trainer_kwargs,
            [GradientDefense(GaussianNoise(std=0.1), layers="attention")],
            module=module,
        )
    for n, p in params(module).items():
        assert torch.equal(p, before[n])


def test_unsupported_strategies_named():
    from lightning.pytorch.strategies import FSDPStrategy

    defense = GradientDefense(GaussianNoise(std=0.1))
    fake = SimpleNamespace(
        strategy=FSDPStrategy(), world_size=1, global_rank=0, gradient_clip_val=None
    )
    with pytest.raises(ValueError, match=r"FSDPStrategy.*strategy='ddp'"):
        defense.setup(fake, BoringModel(**TINY), "fit")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    # DeepSpeedStrategy subclasses DDPStrategy; built without deepspeed installed
    fake.strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    with pytest.raises(ValueError, match=r"DeepSpeedStrategy.*not supported"):
        defense.setup(fake, BoringModel(**TINY), "fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        defense.setup(fake, BoringModel(**TINY), "validate")  # only fitting is checked


def test_epsilon_resumes_from_checkpoint(fast_trainer_kwargs, tmp_path):
    kw = {**fast_trainer_kwargs, "limit_train_batches": 2, "max_steps": -1}
    pipeline = [GradientClipping(max_norm=1.0), GaussianNoise(std=4.0)]

    def run(max_epochs, ckpt_path=None):
        defense = GradientDefense(pipeline, seed=0)
        return fit(kw, [defense], max_steps=-1, max_epochs=max_epochs, ckpt_path=ckpt_path)[0]

    trainer = run(2)
    ckpt = tmp_path / "epoch2.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = run(4, ckpt_path=ckpt)
    straight = run(4)
    eps = resumed.callback_metrics["privacy/epsilon"].item()
    assert eps == straight.callback_metrics["privacy/epsilon"].item()
    assert eps > trainer.callback_metrics["privacy/epsilon"].item()


@pytest.mark.parametrize("placement", ["local", "aggregate"])
def test_ddp_placements_mean_single_in_one_process(fast_trainer_kwargs, placement):
    defense = GradientDefense(GaussianNoise(std=0.1), placement=placement)
    assert defense.placement == placement
    fit(fast_trainer_kwargs, [defense])
    assert defense.placement == "single"


NOISY = [GradientClipping(max_norm=0.5), GaussianNoise(std=0.1), LaplaceNoise(scale=0.05)]


def _noise_threads():
    return [t for t in threading.enumerate() if t.name.startswith("lp-noise-ahead")]


@pytest.fixture
def noise_takes(monkeypatch):
    """Whether each optimizer step found its noise drawn ahead (spies on NoiseAhead.take)."""
    used = []
    take = NoiseAhead.take

    def spy(self, key):
        noise = take(self, key)
        used.append(noise is not None)
        return noise

    monkeypatch.setattr(NoiseAhead, "take", spy)
    return used


@pytest.mark.parametrize("accumulate", [1, 2])
def test_noise_drawn_ahead_is_bitwise_the_noise_drawn_in_the_hook(
    fast_trainer_kwargs, accumulate, noise_takes
):
    ahead = GradientDefense(NOISY, seed=3)
    steps = dict(max_steps=3, accumulate_grad_batches=accumulate)
    _, early = fit(fast_trainer_kwargs, [ahead], **steps)
    assert noise_takes == [True, True, True]  # every step used the draw made in the background
    in_hook = GradientDefense(NOISY, seed=3, draw_noise_ahead=False)
    _, late = fit(fast_trainer_kwargs, [in_hook], **steps)
    assert noise_takes[3:] == [False, False, False]
    assert _noise_threads() == []  # thread stopped
    for (n, a), b in zip(params(early).items(), params(late).values(), strict=True):
        assert torch.equal(a, b), n
    _, other_seed = fit(fast_trainer_kwargs, [GradientDefense(NOISY, seed=4)], **steps)
    assert not torch.equal(params(early)["net.0.weight"], params(other_seed)["net.0.weight"])


def test_noise_is_drawn_in_the_hook_where_it_cannot_be_drawn_ahead(
    fast_trainer_kwargs, noise_takes
):
    random_mask = GradientDefense([GaussianNoise(std=0.1), RandomPruning(ratio=0.5)])
    fit(fast_trainer_kwargs, [random_mask])
    assert noise_takes and not any(noise_takes) and _noise_threads() == []
    with pytest.raises(TypeError, match="draw_noise_ahead"):
        GradientDefense(GaussianNoise(std=0.1), draw_noise_ahead=1)


class SelfClippedGaussian(GradientTransform):
    """A user's transform that is a Gaussian mechanism alone (clips and noises itself)."""

    provides_formal_dp = True

    def __init__(self, max_norm, std):
        self.max_norm, self.std = max_norm, std

    def mechanism(self):
        from lightning_privacy.defenses import FormalMechanism

        return FormalMechanism(self.max_norm, self.std)

    def __call__(self, gradients, *, generator=None):
        clipped = GradientClipping(max_norm=self.max_norm)(gradients)
        return GaussianNoise(std=self.std)(clipped, generator=generator)


@pytest.mark.parametrize(
    ("pipeline", "formal"),
    [
        ([GradientClipping(max_norm=1.0), GaussianNoise(std=4.0)], (1.0, 4.0)),
        # pruning after the noise is post-processing; before the clipping it cannot raise the bound
        (
            [GradientClipping(max_norm=1.0), GaussianNoise(std=4.0), MagnitudePruning(ratio=0.5)],
            (1.0, 4.0),
        ),
        (
            [RandomPruning(ratio=0.5), GradientClipping(max_norm=1.0), GaussianNoise(std=4.0)],
            (1.0, 4.0),
        ),
        ([SelfClippedGaussian(1.0, 4.0)], (1.0, 4.0)),
        # noise before clipping, pruning between clipping and noise, zero noise: no mechanism
        ([GaussianNoise(std=4.0), GradientClipping(max_norm=1.0)], None),
        (
            [GradientClipping(max_norm=1.0), MagnitudePruning(ratio=0.5), GaussianNoise(std=4.0)],
            None,
        ),
        ([GradientClipping(max_norm=1.0), GaussianNoise(std=0.0)], None),
        ([GradientClipping(max_norm=1.0), LaplaceNoise(scale=4.0)], None),
    ],
)
def test_formal_pipeline_is_recognised_from_metadata(fast_trainer_kwargs, pipeline, formal):
    defense = GradientDefense(pipeline, seed=0)
    assert defense.formal == formal
    trainer, _ = fit(
        {**fast_trainer_kwargs, "limit_train_batches": 2}, [defense], max_steps=-1, max_epochs=1
    )
    assert ("privacy/epsilon" in trainer.callback_metrics) == (formal is not None)


# ---------------------------------------------------------------- issue 14: honest ε


class SteppedTimes(BoringModel):
    """Manual optimization that steps every batch ``times`` times (each on a fresh backward)."""

    def __init__(self, times: int, *, raw: bool = False, optimizers: int = 1) -> None:
        super().__init__(**TINY, manual=True)
        self.times, self.raw, self.n_optimizers = times, raw, optimizers

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizers = self.optimizers(use_pl_optimizer=not self.raw)
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for _ in range(self.times):
            for optimizer in optimizers:
                optimizer.zero_grad()
                self.manual_backward(self.loss_fn(self(x), y))
                optimizer.step()

    def configure_optimizers(self):
        if self.n_optimizers == 1:
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        layers = list(self.net)
        return [
            torch.optim.SGD(layers[0].parameters(), lr=self.lr),
            torch.optim.SGD(layers[-1].parameters(), lr=self.lr),
        ]


def _epsilon(kw, module, train=None, **defense_kw):
    pipeline = [GradientClipping(max_norm=1.0), GaussianNoise(std=4.0)]
    defense = GradientDefense(pipeline, seed=0, target_delta=1e-3, **defense_kw)
    trainer, _ = helpers.fit(
        kw, [defense], module, train if train is not None else train_loader(), max_epochs=2
    )
    return trainer.callback_metrics["privacy/epsilon"].item()


def _batch_clipping(releases_per_epoch: int, epochs: int = 2) -> float:
    """ε of ``epochs * releases_per_epoch`` Gaussian mechanisms of multiplier 4 / (2 * 1)."""
    from lightning_privacy.functional import dpsgd_epsilon

    steps = epochs * releases_per_epoch
    return dpsgd_epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=steps, delta=1e-3)


def test_issue14_item1_delta_of_one_over_n_or_more_is_refused_and_epsilon_is_never_negative(
    fast_trainer_kwargs,
):
    """Item 1: δ=0.5 logged ε=-0.454; functional ε went negative for a large δ."""
    from lightning_privacy.accountants import BatchClippingAccountant, RDPAccountant
    from lightning_privacy.functional import batch_clipping_epsilon, dpsgd_epsilon

    pipeline = [GradientClipping(max_norm=1.0), GaussianNoise(std=1.0)]
    with pytest.raises(ValueError, match=r"`target_delta`.*< 1/N = 0\.0312.*N=32.*got 0\.5"):
        fit(fast_trainer_kwargs, [GradientDefense(pipeline, target_delta=0.5)], max_epochs=1)
    assert dpsgd_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=0.5) >= 0.0
    assert batch_clipping_epsilon(max_grad_norm=1.0, std=2.0, epochs=1, delta=0.9) >= 0.0
    rdp, clip = RDPAccountant(), BatchClippingAccountant(max_grad_norm=1.0, std=2.0)
    rdp.step(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    clip.step(epochs=1)
    assert rdp.get_epsilon(0.5) >= 0.0 and clip.get_epsilon(0.9) >= 0.0


@pytest.mark.parametrize(
    ("case", "releases"),
    [("a batch stepped 3 times", 3), ("two optimizers", 2), ("2N samples with replacement", 8)],
)
def test_issue14_item2_batch_clipping_epsilon_composes_every_release(
    fast_trainer_kwargs, case, releases
):
    """Item 2: the same ε was reported however often an example's gradient was released."""
    once = _epsilon(fast_trainer_kwargs, BoringModel(**TINY))
    assert once == pytest.approx(_batch_clipping(1), rel=1e-6)
    if case == "a batch stepped 3 times":
        measured = _epsilon(fast_trainer_kwargs, SteppedTimes(3))
    elif case == "two optimizers":
        measured = _epsilon(fast_trainer_kwargs, SteppedTimes(1, optimizers=2))
    else:  # 2N draws per epoch with replacement: an example may be in every one of the 8 steps
        x, y = random_tensors(32, (12,), num_classes=3, seed=1, normal=True)
        data = torch.utils.data.TensorDataset(x, y)
        sampler = torch.utils.data.RandomSampler(
            data, replacement=True, num_samples=64, generator=torch.Generator().manual_seed(0)
        )
        train = torch.utils.data.DataLoader(data, batch_size=8, sampler=sampler)
        measured = _epsilon(fast_trainer_kwargs, BoringModel(**TINY), train)
    assert measured == pytest.approx(_batch_clipping(releases), rel=1e-6)
    assert measured > once


def test_issue14_item2_what_the_epsilon_assumed_is_logged(fast_trainer_kwargs, caplog):
    with caplog.at_level(logging.INFO):
        _epsilon(fast_trainer_kwargs, SteppedTimes(3))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "a shuffle without replacement" in said or "a sequence without replacement" in said
    assert "up to 3 releases" in said


def test_issue14_item5_stepping_the_raw_optimizer_is_refused_before_its_update(
    fast_trainer_kwargs,
):
    """Item 5: manual optimization with use_pl_optimizer=False trained with no defense."""
    module = SteppedTimes(1, raw=True)
    before = params(module)
    refused = r"never defended.*self\.optimizers\(\).*use_pl_optimizer=False"
    with pytest.raises(RuntimeError, match=refused):
        fit(fast_trainer_kwargs, [GradientDefense(GaussianNoise(std=0.1), seed=0)], module=module)
    for n, p in params(module).items():
        assert torch.equal(p, before[n]), f"{n}: an undefended update was applied"
    # the optimizers Lightning wraps are defended (and nothing else is refused)
    fit(fast_trainer_kwargs, [GradientDefense(GaussianNoise(std=0.1), seed=0)], SteppedTimes(2))


class NaNLossAt(BoringModel):
    """The loss of batch ``at`` is NaN (so is every gradient from then on: SGD spreads it)."""

    def __init__(self, at: int = 1) -> None:
        super().__init__(**TINY)
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == self.at else loss


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: "+".join(type(t).__name__ for t in p))
def test_issue14_item10_non_finite_gradients_pass_through_unchanged_with_one_warning(
    fast_trainer_kwargs, pipeline
):
    """Item 10: LowRankFiltering killed training on a NaN gradient (eigh failed to converge)."""
    pre, post = Recorder(), Recorder()
    defense = GradientDefense(pipeline, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(fast_trainer_kwargs, [pre, defense, post], NaNLossAt(1), max_steps=3)
    assert trainer.global_step == 3, "training went on"
    said = [w for w in caught if "NaN or infinite" in str(w.message)]
    assert len(said) == 1 and said[0].category is RuntimeWarning
    for step in (1, 2):  # the NaN step and the one after (weights are NaN now)
        for n, g in pre.grads[step].items():
            assert not g.isfinite().all(), n
            torch.testing.assert_close(post.grads[step][n], g, rtol=0, atol=0, equal_nan=True)
    assert defense._defense.non_finite == 2
