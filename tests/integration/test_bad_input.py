"""Bad held-out batches and modules are refused before the first training step, with the fix."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from test_user_models import ImageClassifier, images, torchvision_resnet18, tuple_loaders
from torch import nn

from lightning_privacy.attacks import InvertingGradients
from lightning_privacy.callbacks import InversionAudit, LeakageMonitor
from lightning_privacy.models import TinyTransformerLM


class Spy(L.Callback):
    """Counts the optimizer steps that happened."""

    steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        Spy.steps += 1


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )


class TwoArgumentForward(ImageClassifier):
    def forward(self, x, scale):
        return self.backbone(x * scale)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x, 1.0), y)


class TokenClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lm = TinyTransformerLM(vocab_size=20, d_model=8, n_layers=1, n_heads=2, max_len=6)

    def forward(self, tokens):
        return self.lm(tokens)[:, -1]

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


x, y = images(4)
tokens = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(0))
CASES = {
    "wrong channel count": (
        cnn,
        (x[:, :1], y),
        r"have 1 channel\(s\), but the first convolution 'backbone.0' expects 3",
    ),
    "wrong image size": (
        cnn,
        (torch.rand(4, 3, 6, 6), y),
        r"rejects held-out inputs of shape \(\d, 3, 6, 6\).*image size",
    ),
    "labels out of range": (
        cnn,
        (x, y + 10),
        r"class ids in \[1\d, 1\d\], but the model outputs 10 logits",
    ),
    "tuple of one element": (cnn, (x,), r"but got a tuple of 1 element.*adapter="),
    "dict with unknown keys": (cnn, {"img": x, "cls": y}, r"keys are \['cls', 'img'\].*input_key"),
}


def _fit(module, callback, fast_trainer_kwargs):
    Spy.steps = 0
    trainer = L.Trainer(max_steps=2, callbacks=[callback, Spy()], **fast_trainer_kwargs)
    trainer.fit(module, tuple_loaders()[0])


@pytest.mark.parametrize("observer", [InversionAudit, LeakageMonitor])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_held_out_batch_is_refused_before_training(case, observer, fast_trainer_kwargs):
    build, batch, message = CASES[case]
    with pytest.raises((ValueError, TypeError), match=message):
        callback = observer(batch=batch, every_n_train_steps=1)  # format errors: at once
        _fit(ImageClassifier(build()), callback, fast_trainer_kwargs)
    assert Spy.steps == 0


def test_a_forward_that_needs_two_arguments_is_refused(fast_trainer_kwargs):
    audit = InversionAudit(InvertingGradients(max_iterations=2), batch=(x, y))
    with pytest.raises(
        ValueError, match=r"forward needs more than the held-out inputs.*forward_fn"
    ):
        _fit(TwoArgumentForward(cnn()), audit, fast_trainer_kwargs)
    assert Spy.steps == 0


def test_token_ids_without_embed_are_refused(fast_trainer_kwargs):
    monitor = LeakageMonitor(batch=(tokens, y), every_n_train_steps=1)
    with pytest.raises(ValueError, match=r"token ids, which have no gradient.*embed_fn"):
        Spy.steps = 0
        trainer = L.Trainer(max_steps=1, callbacks=[monitor, Spy()], **fast_trainer_kwargs)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, y), 2)
        trainer.fit(TokenClassifier(), loader)
    assert Spy.steps == 0


def test_resnet18_monitor_with_defaults_refuses_a_measurement_over_its_bound(fast_trainer_kwargs):
    """torchvision ResNet-18 at 3x64x64, LeakageMonitor() as it comes: refused, with the fix.

    (At 3x32x32 the exact estimate now takes about 15 s per example and is accepted; at 64 px it
    is matrix-free, about 240 s per example predicted, twice the default bound.)
    """
    module = ImageClassifier(torchvision_resnet18())
    batch = images(4, size=64)
    with pytest.raises(
        ValueError, match=r"would take about .* more than max_seconds=120.0.*lower_bound"
    ):
        _fit(module, LeakageMonitor(batch=batch), fast_trainer_kwargs)
    assert Spy.steps == 0


@pytest.mark.parametrize("observer", [InversionAudit, LeakageMonitor])
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("3-channel batch, 1-channel model", r"have 3 channel\(s\), but .* expects 1"),
        ("label 11 of 10 classes", r"class ids in \[11, 11\], but the model outputs 10 logits"),
    ],
)
def test_issue14_item9_the_audits_held_out_batch_is_checked_before_training(
    case, message, observer, fast_trainer_kwargs
):
    """Item 9: LeakageMonitor killed training after 1-2 steps (IndexError: Target 11 is out of
    bounds) and InversionAudit warned at every audit, measuring nothing."""
    from lightning_privacy.data import DigitsDataModule
    from lightning_privacy.models import LeNetDLG, LitClassifier

    x, y = torch.rand(4, 1, 16, 16), torch.tensor([1, 2, 3, 4])
    batch = (
        (x.repeat(1, 3, 1, 1), y) if case.startswith("3-channel") else (x, torch.full_like(y, 11))
    )
    module = LitClassifier(LeNetDLG(10, channels=1, image_size=16))
    Spy.steps = 0
    trainer = L.Trainer(
        max_steps=2,
        callbacks=[observer(batch=batch, every_n_train_steps=1), Spy()],
        **fast_trainer_kwargs,
    )
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, DigitsDataModule(image_size=16, batch_size=16))
    assert Spy.steps == 0, "refused before the first training step"
