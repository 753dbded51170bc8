"""Embedded, offline data sets and their data modules.

Example:
    >>> from lightning_privacy.data import load_lfw_tensors
    >>> load_lfw_tensors(image_size=32)[0].shape[-1]
    32
"""

from lightning_privacy.data.datamodules import (
    DigitsDataModule,
    EmbeddedDataModule,
    LFWDataModule,
    PhotoPatchesDataModule,
    TorchvisionDataModule,
    split_held_out,
)
from lightning_privacy.data.embedded import (
    PHOTO_NAMES,
    load_digits_tensors,
    load_lfw_tensors,
    load_photo_patches,
)

__all__ = [
    "PHOTO_NAMES",
    "DigitsDataModule",
    "EmbeddedDataModule",
    "LFWDataModule",
    "PhotoPatchesDataModule",
    "TorchvisionDataModule",
    "load_digits_tensors",
    "load_lfw_tensors",
    "load_photo_patches",
    "split_held_out",
]
