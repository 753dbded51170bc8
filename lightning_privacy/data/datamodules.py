"""LightningDataModules over the embedded data sets, plus torchvision's CIFAR-10 and MNIST.

The embedded ones need no network. CIFAR-10 and MNIST take ``download=`` from the user and are
never used in tests.

Example:
    >>> dm = DigitsDataModule(batch_size=32, image_size=16)
    >>> dm.setup("fit")
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> tuple(x.shape), dm.num_classes
    ((32, 1, 16, 16), 10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typing_extensions import override

from lightning_privacy._validation import check_float, check_int
from lightning_privacy.data.embedded import (
    PHOTO_NAMES,
    load_digits_tensors,
    load_lfw_tensors,
    load_photo_patches,
)


def split_held_out(
    images: Tensor, labels: Tensor, val_fraction: float, seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """Shuffle with ``seed`` and split off ``val_fraction`` as the held-out set.

    Example:
        >>> train, val = split_held_out(torch.zeros(10, 1), torch.zeros(10), 0.2, seed=0)
        >>> len(train), len(val)
        (8, 2)
    """
    check_float("val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(images) * val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return (
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[val_idx], labels[val_idx]),
    )


class EmbeddedDataModule(L.LightningDataModule):
    """Base class: a tensor data set split once into train and held-out validation sets.

    Args:
        batch_size: Batch size of both loaders.
        image_size: Side of the square images, in pixels.
        channels: 1 (grey) or 3 (RGB).
        val_fraction: Share of the data held out for validation and audits.
        seed: Seed of the split and of the training shuffle.
        num_workers: DataLoader workers.
    """

    num_classes: int = 0
    loader: Callable[..., tuple[Tensor, Tensor]]

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 32,
        channels: int = 1,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.image_size = check_int("image_size", image_size, low=4)
        self.channels = channels
        self.val_fraction = check_float(
            "val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.seed = seed
        self.num_workers = check_int("num_workers", num_workers, low=0)
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None

    def load(self) -> tuple[Tensor, Tensor]:
        """Return all ``(images, labels)`` of the data set."""
        return type(self).loader(image_size=self.image_size, channels=self.channels)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load the tensors and split them (idempotent)."""
        if self.train_set is None:
            images, labels = self.load()
            self.train_set, self.val_set = split_held_out(
                images, labels, self.val_fraction, self.seed
            )

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled training batches (seeded)."""
        assert self.train_set is not None, "call setup() first"
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            self.batch_size,
            shuffle=True,
            generator=gen,
            num_workers=self.num_workers,
        )

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        """Held-out batches in a fixed order."""
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)


class DigitsDataModule(EmbeddedDataModule):
    """Handwritten digits from scikit-learn (1,797 images, 10 classes).

    Example:
        >>> DigitsDataModule().num_classes
        10
    """

    num_classes = 10
    loader = staticmethod(load_digits_tensors)


class LFWDataModule(EmbeddedDataModule):
    """LFW faces vs non-faces from scikit-image (200 images, 2 classes).

    Example:
        >>> LFWDataModule().num_classes
        2
    """

    num_classes = 2
    loader = staticmethod(load_lfw_tensors)


class PhotoPatchesDataModule(EmbeddedDataModule):
    """Patches of scikit-image photos, labelled by photo (RGB by default).

    Example:
        >>> PhotoPatchesDataModule().channels
        3
    """

    num_classes = len(PHOTO_NAMES)
    loader = staticmethod(load_photo_patches)

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 32,
        channels: int = 3,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, image_size, channels, val_fraction, seed, num_workers)


class TorchvisionDataModule(L.LightningDataModule):
    """CIFAR-10 or MNIST from torchvision, for users with a network (``download`` is theirs).

    Args:
        name: ``"cifar10"`` or ``"mnist"``.
        root: Where the data set lives.
        download: Passed to torchvision; ``False`` by default.
        batch_size: Batch size.
        image_size: Images are resized to this side.

    Example:
        >>> TorchvisionDataModule("cifar10", root="/tmp/none").num_classes
        10
    """

    num_classes = 10

    def __init__(
        self,
        name: str = "cifar10",
        root: str = "data",
        download: bool = False,
        batch_size: int = 64,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        if name not in ("cifar10", "mnist"):
            raise ValueError(f"Expected `name` to be 'cifar10' or 'mnist', but got {name!r}.")
        self.name, self.root, self.download = name, root, download
        self.batch_size, self.image_size = batch_size, image_size

    def _dataset(self, train: bool) -> Dataset[Any]:
        from torchvision import datasets, transforms

        tf = transforms.Compose([transforms.Resize(self.image_size), transforms.ToTensor()])
        cls = datasets.CIFAR10 if self.name == "cifar10" else datasets.MNIST
        return cls(self.root, train=train, transform=tf, download=self.download)

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        """Training split."""
        return DataLoader(self._dataset(True), self.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        """Test split used as held-out data."""
        return DataLoader(self._dataset(False), self.batch_size)
