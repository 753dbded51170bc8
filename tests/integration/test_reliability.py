"""Bad arguments are refused when they are given, naming the argument, the range and the value.

The table of the README's reliability section counts these cases by category (with the held-out
batch, flag and sweep-file cases of test_bad_input.py, test_validation.py, sweep/test_check.py
and sweep/test_config.py).
"""

from __future__ import annotations

import pytest
import torch

from lightning_privacy.accountants import create_accountant
from lightning_privacy.attacks import create_attack
from lightning_privacy.callbacks import DPSGD, GradientDefense, InversionAudit, LeakageMonitor
from lightning_privacy.data import DigitsDataModule
from lightning_privacy.defenses import GaussianNoise, create_defense
from lightning_privacy.functional import (
    batch_clipping_epsilon,
    dpsgd_epsilon,
    dpsgd_noise_multiplier,
)
from lightning_privacy.models import LeNetDLG, LitClassifier

NOISE = GaussianNoise(std=0.1)

ACCOUNTING = {
    "DPSGD max_grad_norm=0": (
        lambda: DPSGD(max_grad_norm=0.0, noise_multiplier=1.0),
        "max_grad_norm",
    ),
    "DPSGD noise_multiplier=-1": (
        lambda: DPSGD(max_grad_norm=1.0, noise_multiplier=-1.0),
        "noise_multiplier",
    ),
    "DPSGD both noise and target": (
        lambda: DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_epsilon=1.0),
        "noise_multiplier",
    ),
    "DPSGD target_epsilon=0": (
        lambda: DPSGD(max_grad_norm=1.0, target_epsilon=0.0),
        "target_epsilon",
    ),
    "DPSGD target_delta=0.5 (> 1/N, at fit)": (None, "target_delta"),
    "DPSGD target_delta=2": (
        lambda: DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=2.0),
        "target_delta",
    ),
    "DPSGD accountant='foo'": (
        lambda: DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, accountant="foo"),
        "accountant",
    ),
    "DPSGD epochs=0": (lambda: DPSGD(max_grad_norm=1.0, target_epsilon=1.0, epochs=0), "epochs"),
    "DPSGD max_epsilon=-1": (
        lambda: DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, max_epsilon=-1.0),
        "max_epsilon",
    ),
    "DPSGD grad_sample_mode='ghosts'": (
        lambda: DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, grad_sample_mode="ghosts"),
        "grad_sample_mode",
    ),
    "GradientDefense target_delta=1.5": (
        lambda: GradientDefense(NOISE, target_delta=1.5),
        "target_delta",
    ),
    "GradientDefense max_epsilon=-1": (
        lambda: GradientDefense(NOISE, max_epsilon=-1.0),
        "max_epsilon",
    ),
    "dpsgd_epsilon delta=0": (
        lambda: dpsgd_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=0.0),
        "delta",
    ),
    "dpsgd_epsilon sample_rate=2": (
        lambda: dpsgd_epsilon(noise_multiplier=1.0, sample_rate=2.0, steps=1, delta=1e-5),
        "sample_rate",
    ),
    "dpsgd_noise_multiplier steps=0": (
        lambda: dpsgd_noise_multiplier(
            target_epsilon=1.0, target_delta=1e-5, sample_rate=0.1, steps=0
        ),
        "steps",
    ),
    "batch_clipping_epsilon releases_per_epoch=-1": (
        lambda: batch_clipping_epsilon(
            max_grad_norm=1.0, std=1.0, epochs=1, delta=1e-5, releases_per_epoch=-1
        ),
        "releases_per_epoch",
    ),
    "create_accountant batch_clipping without std": (
        lambda: create_accountant("batch_clipping", max_grad_norm=1.0),
        "std",
    ),
}

COMPONENTS = {
    "create_defense sigma=": (lambda: create_defense("gaussian_noise", sigma=0.1), "sigma"),
    "create_defense std=-1": (lambda: create_defense("gaussian_noise", std=-1.0), "std"),
    "create_defense std=nan": (lambda: create_defense("gaussian_noise", std=float("nan")), "std"),
    "create_defense ratio=1": (lambda: create_defense("magnitude_pruning", ratio=1.0), "ratio"),
    "create_defense scope='all'": (
        lambda: create_defense("magnitude_pruning", ratio=0.5, scope="all"),
        "scope",
    ),
    "create_defense rank=0": (lambda: create_defense("low_rank", rank=0), "rank"),
    "create_defense max_norm=0": (
        lambda: create_defense("gradient_clipping", max_norm=0.0),
        "max_norm",
    ),
    "create_defense 'gausian_noise'": (
        lambda: create_defense("gausian_noise", std=0.1),
        "gaussian_noise",
    ),
    "create_attack max_iteration=": (
        lambda: create_attack("deep_leakage", max_iteration=1),
        "max_iteration",
    ),
    "create_attack 'dlg'": (lambda: create_attack("dlg"), "Unknown attack"),
    "GradientDefense transforms=[]": (lambda: GradientDefense([]), "transforms"),
    "GradientDefense placement='before'": (
        lambda: GradientDefense(NOISE, placement="before"),
        "placement",
    ),
    "GradientDefense layers='(('": (lambda: GradientDefense(NOISE, layers="(("), "layers"),
    "GradientDefense seed=-1": (lambda: GradientDefense(NOISE, seed=-1), "seed"),
}

OBSERVERS_AND_DATA = {
    "InversionAudit num_samples=0": (lambda: InversionAudit(num_samples=0), "num_samples"),
    "InversionAudit max_seconds=-1": (lambda: InversionAudit(max_seconds=-1.0), "max_seconds"),
    "InversionAudit both schedules": (
        lambda: InversionAudit(every_n_epochs=1, every_n_train_steps=1),
        "every_n_epochs",
    ),
    "InversionAudit batch=(x,)": (
        lambda: InversionAudit(batch=(torch.zeros(2, 1, 8, 8),)),
        "batch",
    ),
    "LeakageMonitor estimator='bogus'": (lambda: LeakageMonitor(estimator="bogus"), "estimator"),
    "LeakageMonitor on_exceed='explode'": (
        lambda: LeakageMonitor(on_exceed="explode"),
        "on_exceed",
    ),
    "LeakageMonitor every_n_train_steps=0": (
        lambda: LeakageMonitor(every_n_train_steps=0),
        "every_n_train_steps",
    ),
    "DigitsDataModule batch_size=0": (lambda: DigitsDataModule(batch_size=0), "batch_size"),
    "DigitsDataModule val_fraction=1": (lambda: DigitsDataModule(val_fraction=1.0), "val_fraction"),
    "DigitsDataModule seed=-1": (lambda: DigitsDataModule(seed=-1), "seed"),
    "LeNetDLG image_size=10": (lambda: LeNetDLG(10, channels=1, image_size=10), "image_size"),
    "LeNetDLG init='unifrom'": (lambda: LeNetDLG(10, channels=1, init="unifrom"), "init"),
    "LitClassifier optimizer='adamw'": (
        lambda: LitClassifier(LeNetDLG(10, channels=1), optimizer="adamw"),
        "optimizer",
    ),
}

CASES = {
    **{f"accounting: {k}": v for k, v in ACCOUNTING.items()},
    **{f"components: {k}": v for k, v in COMPONENTS.items()},
    **{f"observers and data: {k}": v for k, v in OBSERVERS_AND_DATA.items()},
}


@pytest.mark.parametrize("case", [c for c, (build, _) in CASES.items() if build is not None])
def test_bad_argument_is_refused_naming_it(case):
    build, named = CASES[case]
    with pytest.raises((TypeError, ValueError)) as caught:
        build()
    assert named in str(caught.value), str(caught.value)


def test_dpsgd_delta_above_one_over_n_is_refused_before_training(fast_trainer_kwargs):
    import lightning as L

    module = LitClassifier(LeNetDLG(10, channels=1, image_size=8))
    trainer = L.Trainer(
        max_steps=1,
        callbacks=[DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, target_delta=0.5)],
        **fast_trainer_kwargs,
    )
    with pytest.raises(ValueError, match=r"`target_delta` to be > 0 and < 1/N .* got 0\.5"):
        trainer.fit(module, DigitsDataModule(image_size=8, batch_size=64))
    assert trainer.global_step == 0
