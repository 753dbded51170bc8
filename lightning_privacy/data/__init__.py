"""Embedded, offline data sets and their data modules.

The data modules (Lightning) are imported on first use; the tensors need no Lightning.

Example:
    >>> from lightning_privacy.data import load_lfw_tensors
    >>> load_lfw_tensors(image_size=32)[0].shape[-1]
    32
"""

from typing import TYPE_CHECKING

from lightning_privacy._lazy import lazy_exports
from lightning_privacy.data.canaries import Canaries, CanaryDataset, with_canaries
from lightning_privacy.data.embedded import (
    PHOTO_NAMES,
    load_digits_tensors,
    load_lfw_tensors,
    load_photo_patches,
)

if TYPE_CHECKING:
    from lightning_privacy.data.datamodules import (
        DigitsDataModule,
        EmbeddedDataModule,
        LFWDataModule,
        PhotoPatchesDataModule,
        TorchvisionDataModule,
        split_held_out,
    )

# The data modules (Lightning) are imported on first use; the embedded tensors need no Lightning.
__getattr__ = lazy_exports(
    __name__,
    {
        name: ".datamodules"
        for name in (
            "DigitsDataModule",
            "EmbeddedDataModule",
            "LFWDataModule",
            "PhotoPatchesDataModule",
            "TorchvisionDataModule",
            "split_held_out",
        )
    },
)

__all__ = [
    "PHOTO_NAMES",
    "Canaries",
    "CanaryDataset",
    "DigitsDataModule",
    "EmbeddedDataModule",
    "LFWDataModule",
    "PhotoPatchesDataModule",
    "TorchvisionDataModule",
    "load_digits_tensors",
    "load_lfw_tensors",
    "load_photo_patches",
    "split_held_out",
    "with_canaries",
]
