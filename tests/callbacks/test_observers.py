"""What every observer shares: distinct state keys, checkpointed histories, one failure policy."""

import warnings

import pytest
import torch.nn.functional as F
from helpers import BoringModel, digits, fit, loader
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_privacy.attacks import DeepLeakage, InvertingGradients
from lightning_privacy.callbacks import GradientDefense, InversionAudit, LeakageMonitor
from lightning_privacy.defenses import GaussianNoise


def _loaders():
    x, y = digits()
    return loader(x[:32], y[:32], batch_size=16), loader(x[-8:], y[-8:], batch_size=8)


def _observers():
    return [
        InversionAudit(DeepLeakage(max_iterations=2, restarts=1), every_n_epochs=1),
        InversionAudit(InvertingGradients(max_iterations=2), every_n_epochs=2, log_images=False),
        LeakageMonitor(every_n_epochs=1, num_samples=1),
        LeakageMonitor(every_n_epochs=1, num_samples=1, estimator="lower_bound"),
    ]


def _fit(callbacks, kwargs, max_epochs, **fit_kwargs):
    defense = GradientDefense(GaussianNoise(std=1e-3), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer, _ = fit(
            kwargs,
            [defense, *callbacks],
            BoringModel(),
            *_loaders(),
            max_epochs=max_epochs,
            **fit_kwargs,
        )
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


class LossFailsForObservers(BoringModel):
    """Trains with cross-entropy; the loss it hands observers breaks once training has started.

    (Before training the observers replay the loss once and would refuse a broken one outright.)
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.broken = False
        self.loss_fn = self._observed_loss

    def _observed_loss(self, logits, targets):
        if self.broken:
            raise RuntimeError("broken loss")
        return F.cross_entropy(logits, targets)

    def on_train_start(self):
        self.broken = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


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
    train, val = _loaders()
    observer = make_observer(next(iter(val)))
    with pytest.warns(RuntimeWarning, match="broken loss"):
        trainer, _ = fit(
            fast_trainer_kwargs, [observer], LossFailsForObservers(), train, max_steps=2
        )
    assert trainer.global_step == 2
    assert [h["failed"] for h in observer.history] == ["raised RuntimeError: broken loss"] * 2


def test_a_measurement_reports_its_progress(fast_trainer_kwargs, monkeypatch):
    import contextlib

    import lightning_privacy.callbacks.leakage_monitor as monitor_module

    calls = []

    @contextlib.contextmanager
    def recording(trainer, description, *, total):
        calls.append((description.split(",")[0], total))
        yield lambda done, total: calls.append((done, total))

    monkeypatch.setattr(monitor_module, "measurement_progress", recording)
    train, val = _loaders()
    monitor = LeakageMonitor(every_n_train_steps=1, num_samples=2, batch=next(iter(val)))
    fit(fast_trainer_kwargs, [monitor], BoringModel(), train, max_steps=1)
    assert calls == [("LeakageMonitor: exact I2F", 2), (1, 2), (2, 2)]
