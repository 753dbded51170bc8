import lightning as L
import pytest
import torch

from lightning_privacy.data import DigitsDataModule
from lightning_privacy.models import LeNetDLG, LitClassifier, init_weights, resnet18_cifar


@pytest.mark.parametrize("init", ["uniform", "normal", "kaiming", "xavier", "default"])
def test_lenet_inits(init):
    model = LeNetDLG(num_classes=10, channels=1, image_size=32, init=init)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    if init == "uniform":
        assert all(float(p.detach().abs().max()) <= 0.5 for p in model.parameters())
        assert isinstance(model.features[1], torch.nn.Sigmoid)


def test_bad_init_and_size():
    with pytest.raises(ValueError, match="init"):
        LeNetDLG(init="orthogonal")
    with pytest.raises(ValueError, match="divisible by 4"):
        LeNetDLG(image_size=30)
    with pytest.raises(ValueError, match="init"):
        init_weights(torch.nn.Linear(1, 1), "x")


def test_resnet18_cifar_stem():
    model = resnet18_cifar(num_classes=4, channels=1, norm="group")
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 4)


def test_lit_classifier_learns_digits(fast_trainer_kwargs):
    L.seed_everything(0)
    lenet = LeNetDLG(num_classes=10, channels=1, image_size=16, init="uniform")
    module = LitClassifier(lenet, lr=0.003, optimizer="adam")
    trainer = L.Trainer(max_epochs=3, **fast_trainer_kwargs)
    trainer.fit(module, DigitsDataModule(image_size=16, batch_size=32))
    assert float(trainer.callback_metrics["val/acc"]) > 0.5
