import warnings
from dataclasses import dataclass

import lightning as L
import pytest
import torch
from helpers import BoringModel, digits, digits_loader, fit, loader
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger

from lightning_privacy.adapters import resolve_adapter
from lightning_privacy.attacks import Attack, InvertingGradients
from lightning_privacy.callbacks import GradientDefense, InversionAudit
from lightning_privacy.defenses import GaussianNoise
from lightning_privacy.functional.attacks import Reconstruction


def _fit(callbacks, fast_trainer_kwargs, *, max_epochs=2, val=True, **kwargs):
    """The default BoringModel on 48 shuffled digits, validated on 16 of them."""
    L.seed_everything(7, workers=True)
    val_loader = loader(*digits(16), batch_size=8) if val else None
    return fit(
        fast_trainer_kwargs,
        callbacks,
        BoringModel(),
        digits_loader(shuffle=True),
        val_loader,
        max_epochs=max_epochs,
        **kwargs,
    )


FAST_IG = InvertingGradients(max_iterations=4, tv_weight=0.01)


def test_audit_never_changes_the_training_trajectory(fast_trainer_kwargs):
    _, plain = _fit([GradientDefense([GaussianNoise(std=0.01)], seed=0)], fast_trainer_kwargs)
    audit = InversionAudit(FAST_IG, every_n_train_steps=1, num_samples=2, log_images=False)
    trainer, audited = _fit(
        [GradientDefense([GaussianNoise(std=0.01)], seed=0), audit], fast_trainer_kwargs
    )
    assert len(audit.history) == trainer.global_step == 6
    for a, b in zip(plain.state_dict().values(), audited.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert trainer.callback_metrics["attack/defended"] == 1.0
    assert audit.history[-1]["threat_model"]["bn_mode"] == "eval"
    assert audit.history[-1]["threat_model"]["labels_known"] is False


def test_metrics_reach_callback_metrics_and_early_stopping(fast_trainer_kwargs, tmp_path):
    x, y = digits(4)
    audit = InversionAudit(FAST_IG, batch=(x, y), every_n_epochs=1)
    stop = EarlyStopping(monitor="attack/psnr", mode="min", stopping_threshold=1000.0)
    trainer, _ = _fit(
        [audit, stop],
        fast_trainer_kwargs,
        max_epochs=3,
        val=False,
        logger=CSVLogger(tmp_path),
        limit_val_batches=0,
    )
    for key in ("attack/psnr", "attack/ssim", "attack/mse", "attack/label_acc", "attack/seconds"):
        assert key in trainer.callback_metrics
    assert trainer.current_epoch == 1 and len(audit.history) == 1  # stopped by the audit metric
    assert 0 <= float(trainer.callback_metrics["attack/label_acc"]) <= 1
    assert trainer.callback_metrics["attack/defended"] == 0.0
    pngs = list(tmp_path.rglob("inversion_audit/step_*.png"))
    assert len(pngs) == 1


@dataclass(frozen=True)
class _Raises(Attack):
    def reconstruct(
        self,
        model,
        gradients,
        *,
        input_shape,
        num_samples,
        labels=None,
        loss_fn=None,
        generator=None,
    ):
        raise RuntimeError("boom")


@dataclass(frozen=True)
class _NaN(Attack):
    def reconstruct(
        self,
        model,
        gradients,
        *,
        input_shape,
        num_samples,
        labels=None,
        loss_fn=None,
        generator=None,
    ):
        return Reconstruction(
            inputs=torch.full((num_samples, *input_shape), float("nan")), labels=None
        )


@pytest.mark.parametrize(
    ("attack", "what"), [(_Raises(), "raised RuntimeError"), (_NaN(), "returned NaN")]
)
def test_failing_attack_warns_and_training_continues(attack, what, fast_trainer_kwargs):
    audit = InversionAudit(attack, every_n_train_steps=2, log_images=False)
    with pytest.warns(RuntimeWarning, match=what):
        trainer, _ = _fit([audit], fast_trainer_kwargs, max_epochs=1)
    assert trainer.global_step == 3
    assert audit.history and all("failed" in h for h in audit.history)
    assert "attack/psnr" not in trainer.callback_metrics


def test_state_dict_round_trip():
    audit = InversionAudit(FAST_IG, seed=3)
    audit.history.append({"step": 5, "attack/psnr": 12.0})
    torch.rand(3, generator=audit.generator)
    state = audit.state_dict()
    other = InversionAudit(FAST_IG, seed=3)
    other.load_state_dict(state)
    assert other.history == audit.history and other._last_step == audit._last_step
    assert torch.equal(
        torch.rand(2, generator=other.generator), torch.rand(2, generator=audit.generator)
    )


def test_bad_input_is_rejected_before_training(fast_trainer_kwargs):
    x, y = digits(4)
    with pytest.raises(ValueError, match="Unknown attack"):
        InversionAudit("inverting_gradient")
    with pytest.raises(ValueError, match="num_samples"):
        InversionAudit(batch=(x, y), num_samples=5)
    with pytest.raises(ValueError, match="at most one"):
        InversionAudit(every_n_epochs=1, every_n_train_steps=1)
    with pytest.raises(ValueError, match="max_seconds"):
        InversionAudit(max_seconds=0)
    with pytest.raises(ValueError, match="max_seconds"):
        InversionAudit(max_seconds=-1.0)
    module = BoringModel()
    trainer = L.Trainer(max_epochs=1, callbacks=[InversionAudit(FAST_IG)], **fast_trainer_kwargs)
    with pytest.raises(ValueError, match="no held-out batch"):
        trainer.fit(module, digits_loader(shuffle=True))
    assert trainer.global_step == 0
    trainer = L.Trainer(
        max_epochs=1, callbacks=[InversionAudit(FAST_IG, num_samples=9)], **fast_trainer_kwargs
    )
    with pytest.raises(ValueError, match="num_samples"):
        trainer.fit(module, digits_loader(shuffle=True), loader(x, y, batch_size=8))
    tokens = torch.randint(0, 10, (4, 6))
    trainer = L.Trainer(
        max_epochs=1, callbacks=[InversionAudit(batch=(tokens, tokens))], **fast_trainer_kwargs
    )
    with pytest.raises(ValueError, match="token_leakage"):
        trainer.fit(module, digits_loader(shuffle=True))
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[InversionAudit("token_leakage", batch=(x, y))],
        **fast_trainer_kwargs,
    )
    with pytest.raises(ValueError, match="attacks text models"):
        trainer.fit(module, digits_loader(shuffle=True))
    assert trainer.global_step == 0


def test_global_rng_stream_untouched_by_an_audit_run():
    module = BoringModel()
    x, y = digits(2)
    audit = InversionAudit(FAST_IG, batch=(x, y), log_images=False)
    audit._held_out, audit._adapter = (x[:1], y[:1]), resolve_adapter(module, None)

    class _Trainer:
        is_global_zero = True
        world_size = 1
        global_step = 0
        current_epoch = 0
        callbacks: list = []
        loggers: list = []
        callback_metrics: dict = {}

    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audit._observe(_Trainer(), module, on_step=True)
    assert torch.equal(state, torch.get_rng_state())
    assert "attack/psnr" in _Trainer.callback_metrics


def test_apply_defenses_false_attacks_the_clean_gradient():
    module = BoringModel()
    x, y = digits(2)

    class _Trainer:
        is_global_zero = True
        world_size = 1
        global_step = 0
        current_epoch = 0
        callbacks = [GradientDefense([GaussianNoise(std=10.0)], seed=0)]
        loggers: list = []
        callback_metrics: dict = {}

    for apply, defended in ((True, 1.0), (False, 0.0)):
        audit = InversionAudit(FAST_IG, batch=(x, y), apply_defenses=apply, log_images=False)
        audit._held_out, audit._adapter = (x[:1], y[:1]), resolve_adapter(module, None)
        audit._observe(_Trainer(), module, on_step=True)
        assert _Trainer.callback_metrics["attack/defended"] == defended
        assert audit.history[-1]["threat_model"]["defended"] is bool(defended)
