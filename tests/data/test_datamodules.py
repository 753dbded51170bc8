"""The library's data modules: a resumed run sees the data order of an uninterrupted one."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_privacy.callbacks import GradientDefense
from lightning_privacy.data import DigitsDataModule, LFWDataModule
from lightning_privacy.defenses import GaussianNoise, GradientClipping
from lightning_privacy.models import LeNetDLG, LitClassifier


def _fit(kw, max_epochs, ckpt_path=None, datamodule_cls=DigitsDataModule):
    torch.manual_seed(0)
    module = LitClassifier(LeNetDLG(datamodule_cls.num_classes, channels=1, image_size=8))
    pipeline = [GradientClipping(max_norm=1.0), GaussianNoise(std=0.01)]
    trainer = L.Trainer(
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=0,
        callbacks=[GradientDefense(pipeline, seed=0)],
        **kw,
    )
    data = datamodule_cls(image_size=8, batch_size=16, seed=3)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.parametrize("datamodule_cls", [DigitsDataModule, LFWDataModule])
def test_issue14_item11_resumed_run_ends_bitwise_equal_to_the_uninterrupted_one(
    fast_trainer_kwargs, tmp_path, datamodule_cls
):
    """Item 11: the loader re-seeded its shuffle when rebuilt, so a resume replayed epoch 0."""
    straight_trainer, straight = _fit(fast_trainer_kwargs, 3, datamodule_cls=datamodule_cls)
    first, _ = _fit(fast_trainer_kwargs, 1, datamodule_cls=datamodule_cls)
    ckpt = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(ckpt)
    resumed_trainer, resumed = _fit(fast_trainer_kwargs, 3, ckpt, datamodule_cls=datamodule_cls)
    assert resumed_trainer.global_step == straight_trainer.global_step == 12
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_each_epoch_has_its_own_order_and_rebuilding_the_loader_keeps_it():
    data = DigitsDataModule(image_size=8, batch_size=8, seed=1)
    data.setup("fit")
    loader = data.train_dataloader()
    epochs = [torch.cat([y for _, y in loader]) for _ in range(3)]
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    rebuilt = data.train_dataloader()
    rebuilt.sampler.set_epoch(2)  # what Lightning does before epoch 2 of a resumed run
    assert torch.equal(torch.cat([y for _, y in rebuilt]), epochs[2])
    assert sorted(epochs[0].tolist()) == sorted(epochs[1].tolist())  # a shuffle of the same set
