"""What every observer shares: distinct state keys, checkpointed histories, one failure policy."""

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_privacy.attacks import DeepLeakage, InvertingGradients
from lightning_privacy.callbacks import GradientDefense, InversionAudit, LeakageMonitor
from lightning_privacy.data import load_digits_tensors
from lightning_privacy.defenses import GaussianNoise
from lightning_privacy.models import LeNetDLG, LitClassifier


def _loaders():
    x, y = load_digits_tensors(image_size=8, channels=1)
    train = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)
    val = DataLoader(TensorDataset(x[-8:], y[-8:]), batch_size=8)
    return train, val


def _observers():
    return [
        InversionAudit(DeepLeakage(max_iterations=2, restarts=1), every_n_epochs=1),
        InversionAudit(InvertingGradients(max_iterations=2), every_n_epochs=2, log_images=False),
        LeakageMonitor(every_n_epochs=1, num_samples=1),
        LeakageMonitor(every_n_epochs=1, num_samples=1, estimator="lower_bound"),
    ]


def _fit(callbacks, kwargs, max_epochs, **fit_kwargs):
    torch.manual_seed(0)
    module = LitClassifier(LeNetDLG(10, channels=1, image_size=8, width=4), lr=0.1)
    defense = GradientDefense(GaussianNoise(std=1e-3), seed=0)
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[defense, *callbacks], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(module, *_loaders(), **fit_kwargs)
    return trainer


def test_two_audits_and_two_monitors_resume_each_with_its_own_history(
    fast_trainer_kwargs, tmp_path
):
    first = _observers()
    assert len({o.state_key for o in first}) == len(first)
    kwargs = {**fast_trainer_kwargs, "enable_checkpointing": True, "limit_val_batches": 1}
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit([*first, saver], kwargs, max_epochs=2)
    assert [len(o.history) for o in first] == [2, 1, 2, 2]
    assert first[0].history[0]["threat_model"]["attack"] == "DeepLeakage"
    assert first[1].history[0]["threat_model"]["attack"] == "InvertingGradients"
    assert first[2].history != first[3].history  # exact I2F vs lower bound

    resumed = _observers()
    _fit(resumed, kwargs, max_epochs=4, ckpt_path=str(tmp_path / "last.ckpt"))
    assert [len(o.history) for o in resumed] == [4, 2, 4, 4]
    for before, after in zip(first, resumed, strict=True):
        assert after.history[: len(before.history)] == before.history  # its own, not a neighbour's


class LossFailsForObservers(LitClassifier):
    """Trains with cross-entropy but hands observers a loss that raises."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = _broken_loss

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


def _broken_loss(logits, targets):
    raise RuntimeError("broken loss")


@pytest.mark.parametrize(
    "make_observer",
    [
        lambda batch: LeakageMonitor(every_n_train_steps=1, num_samples=1, batch=batch),
        lambda batch: InversionAudit(
            DeepLeakage(max_iterations=2, restarts=1), every_n_train_steps=1, batch=batch
        ),
    ],
    ids=["LeakageMonitor", "InversionAudit"],
)
def test_a_failing_measurement_warns_and_training_goes_on(fast_trainer_kwargs, make_observer):
    torch.manual_seed(0)
    module = LossFailsForObservers(LeNetDLG(10, channels=1, image_size=8, width=4), lr=0.1)
    train, val = _loaders()
    observer = make_observer(next(iter(val)))
    trainer = L.Trainer(max_steps=2, callbacks=[observer], **fast_trainer_kwargs)
    with pytest.warns(RuntimeWarning, match="broken loss"):
        trainer.fit(module, train)
    assert trainer.global_step == 2
    assert [h["failed"] for h in observer.history] == ["raised RuntimeError: broken loss"] * 2
