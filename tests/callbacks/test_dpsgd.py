import math
import warnings

import helpers
import opacus.accountants as oa
import pytest
import torch
import torch.nn.functional as F
from helpers import BoringModel, digits_datamodule, flat_parameters
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_privacy.callbacks.dpsgd import DPSGD, find_unsupported_layers
from lightning_privacy.models import LitClassifier

# Opacus has no per-sample gradients for BatchNorm: the shared module without it
DP_MODULE = dict(batch_norm=False)


def fit(callbacks, trainer_kwargs, module=None, data=None, **kw):
    """Fit ``module`` (default: the DP module) on all the digits, batch 64 (1438 -> q = 1/23)."""
    module = BoringModel(**DP_MODULE) if module is None else module
    data = digits_datamodule() if data is None else data
    return helpers.fit(trainer_kwargs, callbacks, module, data, **kw)[0]


class PerSampleLoss(BoringModel):
    """Opts in to ghost clipping: training_step returns per-sample losses."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")


def test_epsilon_equals_opacus_accountant(fast_trainer_kwargs):
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.1)
    trainer = fit([dp], fast_trainer_kwargs, max_epochs=2, limit_val_batches=0)
    steps = trainer.global_step
    assert steps == 2 * 23  # 1438 training digits, batch 64 -> q = 1/23
    assert dp.sample_rate == 1 / 23
    theirs = oa.RDPAccountant()
    for _ in range(steps):
        theirs.step(noise_multiplier=1.1, sample_rate=1 / 23)
    assert abs(dp.epsilon - theirs.get_epsilon(dp.delta)) <= 1e-9
    assert dp.delta == pytest.approx(1 / (10 * 1438))
    logged = trainer.callback_metrics
    assert float(logged["privacy/epsilon"]) == pytest.approx(dp.epsilon, rel=1e-6)
    assert float(logged["privacy/delta"]) == pytest.approx(dp.delta, rel=1e-6)
    assert float(logged["privacy/noise_multiplier"]) == pytest.approx(1.1)
    assert float(logged["privacy/sample_rate"]) == pytest.approx(1 / 23, rel=1e-6)


def test_target_epsilon_prv_reached(fast_trainer_kwargs):
    dp = DPSGD(max_grad_norm=1.0, target_epsilon=2.0, accountant="prv", target_delta=1e-5)
    fit([dp], fast_trainer_kwargs, max_epochs=1, limit_train_batches=5, limit_val_batches=0)
    theirs = oa.PRVAccountant()
    for _ in range(5):
        theirs.step(noise_multiplier=dp.noise_multiplier, sample_rate=1 / 23)
    assert abs(dp.epsilon - theirs.get_epsilon(1e-5)) <= 1e-9
    assert 1.95 <= dp.epsilon <= 2.0  # planned for exactly these 5 steps


class Spy(Callback):
    """Per-sample gradients before the DP step; clipped sum and noisy gradient after it."""

    def __init__(self, dp):
        self.dp, self.records = dp, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._g = [p.grad_sample.detach().flatten(1).clone() for p in pl_module.parameters()]
        self.expected_batch_size = optimizer.expected_batch_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = list(pl_module.parameters())
        summed = torch.cat([p.summed_grad.flatten() for p in params])
        grad = torch.cat([p.grad.flatten() for p in params])
        self.records.append((torch.cat(self._g, 1), summed, grad))


def test_every_per_sample_gradient_is_clipped(fast_trainer_kwargs):
    c = 0.05
    dp = DPSGD(max_grad_norm=c, noise_multiplier=1.0)
    spy = Spy(dp)
    fit([dp, spy], fast_trainer_kwargs, max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    assert len(spy.records) == 3
    for per_sample, summed, _ in spy.records:
        # recover the factors the optimizer actually applied: summed = sum_i c_i g_i
        coef = torch.linalg.lstsq(per_sample.T.double(), summed.double().unsqueeze(1)).solution
        coef = coef.squeeze(1)
        assert torch.allclose(per_sample.T.double() @ coef, summed.double(), atol=1e-5)
        clipped = coef * per_sample.double().norm(dim=1)
        assert float(per_sample.norm(dim=1).max()) > 2 * c  # clipping was active
        assert float(clipped.max()) <= c * (1 + 1e-4)
        assert float(clipped.max()) >= 0.99 * c


def test_noise_std_on_summed_gradient(fast_trainer_kwargs):
    sigma, c = 2.0, 0.5
    dp = DPSGD(max_grad_norm=c, noise_multiplier=sigma)
    spy = Spy(dp)
    fit([dp, spy], fast_trainer_kwargs, max_epochs=1, limit_train_batches=4, limit_val_batches=0)
    assert spy.expected_batch_size == int(1438 / 23)  # opacus divides the noisy sum by this
    noise = torch.cat([grad * spy.expected_batch_size - summed for _, summed, grad in spy.records])
    n = noise.numel()
    assert n > 5000
    std = float(noise.std())
    # the sample std of n normals is within ~5 standard errors (1/sqrt(2n)) of the truth
    assert abs(std / (sigma * c) - 1) < 5 / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 5 * sigma * c / math.sqrt(n)


def _snapshot(module):
    return {
        name: (
            sorted(k for k in sub.__dict__ if not k.startswith("_")),
            len(sub._forward_hooks),
            len(sub._forward_pre_hooks),
            len(sub._backward_hooks),
            len(getattr(sub, "_backward_pre_hooks", {})),
            sorted(a for p in sub.parameters(recurse=False) for a in vars(p)),
        )
        for name, sub in module.named_modules()
    }


def test_module_comes_back_clean_and_refits(fast_trainer_kwargs):
    module = BoringModel(**DP_MODULE)
    before = _snapshot(module)
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0)
    trainer = fit([dp], fast_trainer_kwargs, module=module, max_epochs=1, limit_train_batches=2)
    assert _snapshot(module) == before
    assert not hasattr(module, "autograd_grad_sample_hooks")
    assert type(trainer.optimizers[0]) is torch.optim.SGD
    assert "backward" not in vars(trainer.precision_plugin)
    # a second fit on the same module works (Opacus refuses to add hooks twice)
    dp2 = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0)
    fit([dp2], fast_trainer_kwargs, module=module, max_epochs=1, limit_train_batches=2)
    assert dp2.accountant.steps == 2
    assert _snapshot(module) == before


def test_resume_after_epoch_two_of_four_gives_same_epsilon(fast_trainer_kwargs, tmp_path):
    kw = {**fast_trainer_kwargs, "limit_train_batches": 4, "limit_val_batches": 0}

    def dpsgd():
        return DPSGD(max_grad_norm=1.0, target_epsilon=4.0, epochs=4)

    full = dpsgd()
    fit([full], kw, max_epochs=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = dpsgd()
    fit([first, ckpt], {**kw, "enable_checkpointing": True}, max_epochs=2)
    assert first.accountant.steps == 8
    resumed = dpsgd()
    trainer = fit([resumed], kw, max_epochs=4, ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 16
    assert resumed.accountant.steps == full.accountant.steps == 16
    assert resumed.noise_multiplier == full.noise_multiplier
    assert resumed.epsilon == full.epsilon
    assert full.epsilon <= 4.0


def test_max_epsilon_stops_with_reason(fast_trainer_kwargs):
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, max_epsilon=3.0)
    trainer = fit(
        [dp], fast_trainer_kwargs, max_epochs=20, limit_train_batches=10, limit_val_batches=0
    )
    assert trainer.current_epoch < 20
    assert dp.epsilon <= 3.0
    assert dp.stopped_reason is not None and "max_epsilon=3.0" in dp.stopped_reason
    per_epoch_more = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0)
    per_epoch_more.accountant.load_state_dict(dp.accountant.state_dict())
    per_epoch_more.delta = dp.delta
    per_epoch_more.accountant.step(noise_multiplier=1.0, sample_rate=1 / 23, steps=10)
    assert per_epoch_more.epsilon > 3.0  # it stopped exactly at the last affordable epoch


def test_max_epsilon_below_one_epoch_is_an_error(fast_trainer_kwargs):
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=0.5, max_epsilon=0.01)
    with pytest.raises(ValueError, match="max_epsilon"):
        fit([dp], fast_trainer_kwargs, max_epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(max_grad_norm=1.0, noise_multiplier=-1.0), ValueError, "noise_multiplier"),
        (dict(max_grad_norm=1.0, noise_multiplier=1.0, target_epsilon=1.0), ValueError, "exactly"),
        (dict(max_grad_norm=1.0), ValueError, "exactly one"),
        (dict(max_grad_norm=0.0, noise_multiplier=1.0), ValueError, "max_grad_norm"),
        (dict(max_grad_norm=-1, noise_multiplier=1.0), ValueError, "max_grad_norm"),
        (dict(max_grad_norm=1.0, noise_multiplier=1.0, accountant="gpd"), ValueError, "accountant"),
        (dict(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1.5), ValueError, "delta"),
        (dict(max_grad_norm=1.0, noise_multiplier=1.0, grad_sample_mode="ew"), ValueError, "mode"),
        (dict(max_grad_norm=1.0, noise_multiplier=1.0, secure_mode=True), ImportError, "csprng"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        DPSGD(**kwargs)


def test_delta_at_least_one_over_n_is_an_error(fast_trainer_kwargs):
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=1 / 1000)
    with pytest.raises(ValueError, match=r"target_delta.*< 1/N"):
        fit([dp], fast_trainer_kwargs, max_epochs=1)


class MyBatchNorm(nn.BatchNorm2d):
    """A timm-style subclass (like BatchNormAct2d) that Opacus's exact-type check misses."""


def bn_module():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        MyBatchNorm(8),
        nn.Flatten(),
        nn.Linear(8 * 64, 10),
    )
    return LitClassifier(net)


def test_unsupported_layers_collected_in_one_error(fast_trainer_kwargs):
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError) as info:
        fit([dp], fast_trainer_kwargs, module=bn_module(), max_epochs=1)
    text = str(info.value)
    assert "2 layer(s)" in text
    assert "'model.1' (BatchNorm2d)" in text and "'model.4' (MyBatchNorm)" in text
    assert "fix_model=True" in text and "GroupNorm" in text


def test_fix_model_fixes_what_opacus_can_and_reports_the_rest(fast_trainer_kwargs):
    module = bn_module()
    with pytest.raises(ValueError, match="MyBatchNorm") as info:
        fit(
            [DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, fix_model=True)],
            fast_trainer_kwargs,
            module=module,
            max_epochs=1,
        )
    assert "BatchNorm2d)" not in str(info.value)
    assert isinstance(module.model[1], nn.GroupNorm)
    module.model[4] = nn.GroupNorm(4, 8)
    assert find_unsupported_layers(module) == []
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, fix_model=True)
    fit([dp], fast_trainer_kwargs, module=module, max_epochs=1, limit_train_batches=2)
    assert dp.accountant.steps == 2


@pytest.mark.parametrize(
    ("trainer_kw", "dp_kw", "match"),
    [
        (dict(accumulate_grad_batches=2), {}, "Poisson"),
        (dict(accumulate_grad_batches=2), dict(poisson_sampling=False), "accumulate_grad_batches"),
        (dict(gradient_clip_val=1.0), {}, "gradient_clip_val"),
        (dict(precision="16-true"), {}, "bf16-mixed"),
    ],
)
def test_trainer_conflicts_are_errors(fast_trainer_kwargs, trainer_kw, dp_kw, match):
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, **dp_kw)
    with pytest.raises(ValueError, match=match):
        fit([dp], fast_trainer_kwargs, max_epochs=1, **trainer_kw)


def test_bf16_mixed_trains(fast_trainer_kwargs):
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0)
    module = BoringModel(**DP_MODULE)
    before = [p.detach().clone() for p in module.parameters()]
    fit(
        [dp],
        fast_trainer_kwargs,
        module=module,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        precision="bf16-mixed",
    )
    assert dp.accountant.steps == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_ghost_clipping_matches_hooks_and_needs_per_sample_losses(fast_trainer_kwargs):
    kw = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    results = {}
    ghost_module = dict(DP_MODULE, dropout=0.0, lr=0.5)
    for mode in ("hooks", "ghost"):
        module = PerSampleLoss(**ghost_module)
        dp = DPSGD(
            max_grad_norm=0.1, noise_multiplier=0.0, poisson_sampling=False, grad_sample_mode=mode
        )
        fit([dp], fast_trainer_kwargs, module=module, **kw)
        results[mode] = flat_parameters(module)
    plain = flat_parameters(PerSampleLoss(**ghost_module))  # the same start, untrained
    assert not torch.allclose(results["hooks"], plain)
    assert torch.allclose(results["hooks"], results["ghost"], atol=1e-5)
    dp = DPSGD(max_grad_norm=0.1, noise_multiplier=1.0, grad_sample_mode="ghost")
    with pytest.raises(ValueError, match="reduction='none'"):
        fit([dp], fast_trainer_kwargs, **kw)


def test_gradient_defense_does_not_compose(fast_trainer_kwargs):
    from lightning_privacy.callbacks import GradientDefense
    from lightning_privacy.defenses import GaussianNoise

    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="GradientDefense"):
        fit([dp, GradientDefense([GaussianNoise(std=0.1)])], fast_trainer_kwargs, max_epochs=1)


def test_observers_see_the_dpsgd_release(fast_trainer_kwargs):
    from lightning_privacy.callbacks._gradient_view import find_gradient_defense
    from lightning_privacy.defenses import GaussianNoise, GradientClipping

    dp = DPSGD(max_grad_norm=0.5, target_epsilon=5.0, epochs=1)
    assert dp.transforms[1].std == 0.0  # z unknown before fit
    trainer = fit([dp], fast_trainer_kwargs, max_epochs=1, limit_train_batches=2)
    assert find_gradient_defense(trainer) is dp
    assert dp.layers is None
    clip, noise = dp.transforms
    assert clip == GradientClipping(max_norm=0.5)
    assert noise == GaussianNoise(std=dp.noise_multiplier * 0.5)
    assert noise.std > 0


class FuncObserver(Callback):
    """Like the observers: torch.func on the module between steps."""

    def __init__(self):
        self.hook_counts, self.grads = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.hook_counts.append(
            sum(len(m._forward_hooks) + len(m._backward_hooks) for m in pl_module.modules())
        )
        params = {k: v.detach() for k, v in pl_module.named_parameters()}
        x, y = batch[0][:2], batch[1][:2]

        def loss(p):
            return F.cross_entropy(torch.func.functional_call(pl_module, p, (x,)), y)

        self.grads.append(torch.func.grad(loss)(params))


def test_hooks_are_attached_only_during_the_step(fast_trainer_kwargs):
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0)
    obs = FuncObserver()
    fit([dp, obs], fast_trainer_kwargs, max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    assert obs.hook_counts == [0, 0, 0]
    assert len(obs.grads) == 3
    assert dp.accountant.steps == 3


def test_issue14_item3_approximate_or_overspent_epsilon_is_warned(fast_trainer_kwargs):
    """Item 3: poisson_sampling=False and a target passed by training longer were silent."""
    with pytest.warns(UserWarning, match=r"poisson_sampling=False.*only an approximation"):
        fit(
            [DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, poisson_sampling=False)],
            fast_trainer_kwargs,
            max_epochs=1,
        )
    dp = DPSGD(max_grad_norm=1.0, target_epsilon=1.0, epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([dp], fast_trainer_kwargs, max_epochs=3)
    said = [str(w.message) for w in caught]
    assert any("planned for 1 epoch(s)" in m and "max_epochs=3" in m for m in said), said
    past = [m for m in said if "has passed target_epsilon=1.0" in m]
    assert len(past) == 1 and dp.epsilon > 1.0, said  # once, at the epoch that passed it
