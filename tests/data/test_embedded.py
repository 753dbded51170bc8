import pytest
import torch

from lightning_privacy.data import (
    DigitsDataModule,
    LFWDataModule,
    PhotoPatchesDataModule,
    load_digits_tensors,
    load_lfw_tensors,
    load_photo_patches,
)


@pytest.mark.parametrize("loader", [load_digits_tensors, load_lfw_tensors, load_photo_patches])
@pytest.mark.parametrize("channels", [1, 3])
def test_loaders_shapes_and_range(loader, channels):
    x, y = loader(image_size=32, channels=channels)
    assert x.shape[1:] == (channels, 32, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.std()) > 0.05  # real images, not blanks


def test_lfw_has_faces_and_non_faces():
    _, y = load_lfw_tensors()
    assert int(y.sum()) == 100 and len(y) == 200


@pytest.mark.parametrize("cls", [DigitsDataModule, LFWDataModule, PhotoPatchesDataModule])
def test_datamodules_split_without_overlap(cls):
    dm = cls(batch_size=8, image_size=16, val_fraction=0.25)
    dm.setup("fit")
    n_train, n_val = len(dm.train_set), len(dm.val_set)
    assert n_val > 0 and n_train > n_val
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape[-1] == 16 and int(y.max()) < dm.num_classes


def test_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        load_digits_tensors(channels=2)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.0)
