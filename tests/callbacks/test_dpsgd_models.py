"""DPSGD on common models: the grouped layer report and the in-place rehearsal.

Every model is wrapped the way a user writes a LightningModule (not our LitClassifier) and trained
on random 3x32x32 images.
"""

import random
import warnings
import weakref

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_privacy.callbacks.dpsgd import DPSGD, find_unsupported_layers
from lightning_privacy.engines import (
    DPSGDEngine,
    LayerProblem,
    find_inplace_writes,
    group_layer_problems,
    layer_problems,
)

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, ResNet  # noqa: E402


class UserModule(L.LightningModule):
    def __init__(self, net, lr=0.05):
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def images(n=16, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def fit(module, trainer_kwargs, *callbacks, data=None, steps=2):
    trainer = L.Trainer(
        max_steps=steps, limit_val_batches=0, callbacks=list(callbacks), **trainer_kwargs
    )
    trainer.fit(module, data or images())
    return trainer


def dpsgd(**kw):
    return DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, **kw)


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


class Block(BasicBlock):
    """The fix DPSGD's docs give for torchvision's ResNet: `out + identity`, not `+=`."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def small_cnn(inplace=True):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


class Snapshot(Callback):
    """The module's weights at fit start (after fix_model, before the rehearsal and any step)."""

    def on_fit_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def assert_untouched(module, snapshot, trainer):
    assert trainer.global_step == 0
    state = module.state_dict()
    assert state.keys() == snapshot.state.keys()
    assert all(torch.equal(state[k], v) for k, v in snapshot.state.items())
    assert all(p.grad is None for p in module.parameters())
    assert not any(hasattr(p, "grad_sample") for p in module.parameters())
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in module.modules()) == 0


# ---------------------------------------------------------------- the grouped layer report
def test_resnet18_batchnorms_are_one_line_with_count_names_and_fix(fast_trainer_kwargs):
    module = UserModule(resnet18())
    with pytest.raises(ValueError) as info:
        fit(module, fast_trainer_kwargs, dpsgd())
    text = str(info.value)
    assert "for 20 layer(s)" in text
    first = "'net.bn1', 'net.layer1.0.bn1', 'net.layer1.0.bn2', … 17 more"
    assert f"\n  - 20 x BatchNorm2d ({first}): BatchNorm cannot support" in text
    assert text.count("BatchNorm cannot support training with differential privacy") == 1
    assert text.count("\n  - ") == 1 and "[fixable: fix_model=True]" in text
    assert "Fix: DPSGD(..., fix_model=True)" in text
    assert len(find_unsupported_layers(module)) == 20  # the public per-layer list is unchanged


class MyBatchNorm(nn.BatchNorm2d):
    """A timm-style subclass Opacus's exact-type check misses (and cannot fix)."""


def test_groups_split_by_type_problem_and_fixability():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), MyBatchNorm(4), nn.BatchNorm2d(4), MyBatchNorm(4)
    )
    lines = group_layer_problems(layer_problems(net))
    assert len(lines) == 2
    assert lines[0].startswith("2 x BatchNorm2d ('1', '3'): BatchNorm cannot support")
    assert lines[0].endswith("[fixable: fix_model=True]")
    assert lines[1].startswith("2 x MyBatchNorm ('2', '4'): a subclass of BatchNorm")
    assert "[fixable" not in lines[1] and "fix_model cannot rebuild it" in lines[1]
    one = LayerProblem("net.x", "MyBatchNorm", "why", fixable=False)
    assert group_layer_problems([one]) == ["'net.x' (MyBatchNorm): why"]


def test_only_unfixable_layers_say_fix_model_cannot_fix_them():
    engine = DPSGDEngine(max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="fix_model=True cannot fix these") as info:
        engine.validate(nn.Sequential(nn.Conv2d(3, 4, 3), MyBatchNorm(4), MyBatchNorm(4)))
    assert "2 x MyBatchNorm ('1', '2')" in str(info.value)


# ---------------------------------------------------------------- in-place writes: the models
def test_torchvision_resnet18_is_refused_before_the_first_step(fast_trainer_kwargs):
    module, snapshot = UserModule(resnet18()), Snapshot()
    callbacks = [snapshot, dpsgd(fix_model=True)]
    trainer = L.Trainer(max_steps=2, callbacks=callbacks, **fast_trainer_kwargs)
    with pytest.raises(ValueError) as info:
        trainer.fit(module, images())
    text = str(info.value)
    assert text.startswith("DPSGD: 8 module(s) modify in place the output of a layer Opacus hooks")
    blocks = "8 x BasicBlock ('net.layer1.0', 'net.layer1.1', 'net.layer2.0', … 5 more)"
    assert f"\n  - {blocks}: `out += identity` (torchvision/models/resnet.py:" in text
    assert "modifies the output of 'net.layer1.0.bn2' (GroupNorm) in place" in text
    assert "`out = out + identity`" in text and "subclass it" in text and "docs show" in text
    assert "set inplace=False on 9 other module(s): 'net.relu', 'net.layer1.0.relu'" in text
    assert module.net.relu.inplace is False and module.net.layer4[1].relu.inplace is False
    assert isinstance(module.net.bn1, nn.GroupNorm)
    assert_untouched(module, snapshot, trainer)


def test_resnet18_with_the_documented_block_trains_two_steps(fast_trainer_kwargs):
    torch.manual_seed(0)
    module = UserModule(ResNet(Block, [2, 2, 2, 2], num_classes=10))
    assert module.state_dict().keys() == UserModule(resnet18()).state_dict().keys()
    dp = dpsgd(fix_model=True)
    trainer = fit(module, fast_trainer_kwargs, dp)
    assert trainer.global_step == 2 and dp.accountant.steps == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_timm_convnext_atto_trains_two_steps(fast_trainer_kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    module = UserModule(timm.create_model("convnext_atto", pretrained=False, num_classes=10))
    dp = dpsgd()
    trainer = fit(module, fast_trainer_kwargs, dp)
    assert trainer.global_step == 2 and dp.accountant.steps == 2


def test_inplace_relu_cnn_is_refused_and_trains_with_fix_model(fast_trainer_kwargs):
    module, snapshot = UserModule(small_cnn()), Snapshot()
    trainer = L.Trainer(max_steps=2, callbacks=[snapshot, dpsgd()], **fast_trainer_kwargs)
    with pytest.raises(ValueError) as info:
        trainer.fit(module, images())
    text = str(info.value)
    assert "2 module(s)" in text
    relus = "2 x ReLU ('net.1', 'net.4')"
    assert f"{relus}: `ReLU(inplace=True)` modifies the output of 'net.0' (Conv2d)" in text
    assert "construct it with inplace=False, or pass DPSGD(fix_model=True)" in text
    assert module.net[1].inplace is True  # reported, not changed, without fix_model
    assert_untouched(module, snapshot, trainer)

    dp = dpsgd(fix_model=True)
    trainer = fit(module, fast_trainer_kwargs, dp)
    assert trainer.global_step == 2 and dp.accountant.steps == 2
    assert module.net[1].inplace is False and module.net[4].inplace is False


# ---------------------------------------------------------------- in-place writes: the ops
class Slicing(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        h = self.conv(x)
        h[:, 0] = 0.0
        return h.mean((2, 3))


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return F.relu(self.lin(x), inplace=True)


def loss_of(x):
    return lambda copy: copy(x).sum()


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_every_kind_of_inplace_write_is_named_in_every_mode(mode):
    net = nn.Sequential(Slicing(), FunctionalRelu(), nn.Linear(4, 2), nn.ReLU(inplace=True))
    writes = find_inplace_writes(net, loss_of(torch.rand(2, 3, 8, 8)), grad_sample_mode=mode)
    got = [(w.name, w.module_type, w.operation, w.producer, w.fixable) for w in writes]
    assert got == [
        ("0", "Slicing", "h[:, 0] = 0.0", "'0.conv' (Conv2d)", False),
        ("1", "FunctionalRelu", "return F.relu(self.lin(x), inplace=True)", "'1.lin' (Linear)", 0),
        ("3", "ReLU", "ReLU(inplace=True)", "'2' (Linear)", True),
    ]
    line = Slicing.forward.__code__.co_firstlineno + 2
    assert writes[0].location.endswith(f"test_dpsgd_models.py:{line}")
    assert not writes[0].in_library


def test_out_of_place_code_passes():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    assert find_inplace_writes(net, loss_of(torch.rand(2, 3, 8, 8))) == []


def test_an_error_the_recorder_did_not_see_is_still_named():
    class Raises(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            raise RuntimeError(
                "Output 0 of BackwardHookFunction is a view and is being modified inplace. This "
                "view was created inside a custom Function (or because an input was returned as-is)"
            )

    net = nn.Sequential(nn.Linear(3, 3), Raises())
    writes = find_inplace_writes(net, loss_of(torch.ones(2, 3)))
    assert [(w.name, w.module_type, w.operation[:5]) for w in writes] == [("1", "Raises", "raise")]


def test_another_error_warns_and_skips_the_check():
    engine = DPSGDEngine(max_grad_norm=1.0, noise_multiplier=1.0)

    def step(copy):
        raise KeyError("no such column")

    with pytest.warns(RuntimeWarning, match="could not rehearse .* KeyError: 'no such column'"):
        assert engine.rehearse(nn.Linear(3, 2), step) == []


# ---------------------------------------------------------------- the rehearsal changes nothing
def test_the_rehearsal_leaves_module_grad_buffers_and_random_streams_alone():
    torch.manual_seed(0)
    frozen_bn = nn.BatchNorm1d(4).requires_grad_(False)  # train mode: its forward updates stats
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), frozen_bn, nn.Dropout(0.5))
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0) if p.requires_grad else None
    state = {k: v.clone() for k, v in net.state_dict().items()}
    streams = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    seen = []

    def step(copy):
        seen.append(weakref.ref(copy))
        assert copy[2].weight is net[2].weight  # frozen parameters are shared, not copied
        assert copy[2].running_mean is not net[2].running_mean
        x = torch.rand(4, 3) + random.random() + float(np.random.rand())
        return copy(x).sum()

    writes = find_inplace_writes(net, step)
    assert [w.name for w in writes] == ["1"]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in net[0].parameters())
    assert not any(vars(p) for p in net.parameters())  # no grad_sample or counters left
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()) == 0
    assert torch.equal(streams[0], torch.get_rng_state()) and streams[1] == random.getstate()
    assert np.array_equal(streams[2], np.random.get_state()[1])
    assert seen[0]() is None  # the copy is gone


class Augmented(Dataset):
    """Draws from torch's, Python's and NumPy's global streams for every example."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(32, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 10, (32,), generator=g)

    def __len__(self):
        return 32

    def __getitem__(self, i):
        noise = 0.1 * torch.rand(()) + 0.1 * random.random() + 0.1 * float(np.random.rand())
        return self.x[i] + noise, self.y[i]


def dropout_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(4 * 36, 10)
    )


def trained_weights(trainer_kwargs, rehearse):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    module = UserModule(dropout_cnn())
    dp = dpsgd()
    if not rehearse:
        dp.engine.rehearse = lambda module, step: []
    data = DataLoader(Augmented(), batch_size=8, shuffle=True)
    fit(module, trainer_kwargs, dp, data=data, steps=3)
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_the_rehearsal_does_not_change_the_trajectory(fast_trainer_kwargs, monkeypatch):
    calls = []
    original = DPSGDEngine.rehearse

    def counted(self, module, step):
        calls.append(type(module).__name__)
        return original(self, module, step)

    monkeypatch.setattr(DPSGDEngine, "rehearse", counted)
    with_check = trained_weights(fast_trainer_kwargs, rehearse=True)
    assert calls == ["UserModule"]
    without = trained_weights(fast_trainer_kwargs, rehearse=False)
    assert torch.equal(with_check, without)
    assert not torch.equal(with_check, torch.cat([p.flatten() for p in dropout_cnn().parameters()]))


class ReadsTheTrainer(UserModule):
    """Reads the Trainer, logs, and returns a dict: the rehearsal's copy must cope with all."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y) * (1 + 0 * self.trainer.global_step)
        self.log("train_loss", loss)
        return {"loss": loss}


def test_the_rehearsal_runs_a_step_that_reads_the_trainer_and_returns_a_dict(
    fast_trainer_kwargs,
):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "could not rehearse" would fail here
        with pytest.raises(ValueError, match=r"2 x ReLU \('net.1', 'net.4'\)"):
            fit(ReadsTheTrainer(small_cnn()), fast_trainer_kwargs, dpsgd())
        dp = dpsgd(fix_model=True)
        fit(ReadsTheTrainer(small_cnn()), fast_trainer_kwargs, dp)
    assert dp.accountant.steps == 2


class HookCount(Callback):
    def on_fit_start(self, trainer, pl_module):
        modules = list(pl_module.modules())
        self.count = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in modules)


def test_the_module_is_hook_free_from_fit_start_to_the_first_step(fast_trainer_kwargs):
    dp, seen = dpsgd(), HookCount()  # an observer's on_fit_start runs after DPSGD's
    fit(UserModule(small_cnn(inplace=False)), fast_trainer_kwargs, dp, seen)
    assert seen.count == 0 and dp.accountant.steps == 2
