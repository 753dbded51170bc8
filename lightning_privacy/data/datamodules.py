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
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset
from typing_extensions import override

from lightning_privacy._validation import check_bool, check_choice, check_float, check_int
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


class EpochShuffle(RandomSampler):
    """A shuffle without replacement whose order depends only on ``(seed, epoch)``.

    Epoch ``e`` yields the order a ``DataLoader(shuffle=True,
    generator=torch.Generator().manual_seed(seed))`` gives in its epoch ``e`` when it is built
    once (the data modules' order before this sampler existed), however often the loader is
    rebuilt. Lightning calls
    :meth:`set_epoch` before every epoch (also the first one after resuming from a checkpoint),
    so a resumed run sees the same data order as an uninterrupted one. Iterated without
    ``set_epoch`` it moves to the next epoch by itself.

    Args:
        data_source: The data set.
        seed: The seed of the shuffle.

    Example:
        >>> sampler = EpochShuffle(range(5), seed=0)
        >>> first, second = list(sampler), list(sampler)
        >>> sampler.set_epoch(1)
        >>> list(sampler) == second != first
        True
        >>> loader = DataLoader(range(5), shuffle=True, generator=torch.Generator().manual_seed(0))
        >>> [[int(i) for i in loader] for _ in range(2)] == [first, second]  # shuffle=True's
        True
    """

    def __init__(self, data_source: Any, *, seed: int) -> None:
        super().__init__(data_source)
        self.seed = check_int("seed", seed, low=0)
        self.epoch = 0
        self._cursor: tuple[int, torch.Generator] | None = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration shuffles for (Lightning calls it before each one)."""
        self.epoch = check_int("epoch", epoch, low=0)

    def _generator_at(self, epoch: int) -> torch.Generator:
        """The generator positioned before epoch ``epoch``'s draws."""
        if self._cursor is not None and self._cursor[0] == epoch:
            return self._cursor[1]
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch):
            _draw_epoch(generator, len(self.data_source))
        return generator

    @override
    def __iter__(self) -> Any:
        epoch = self.epoch
        generator = self._generator_at(epoch)
        order = _draw_epoch(generator, len(self.data_source)).tolist()
        self._cursor = (epoch + 1, generator)
        self.epoch = epoch + 1
        return iter(order)


def _draw_epoch(generator: torch.Generator, n: int) -> Tensor:
    """One epoch's draws of ``DataLoader(shuffle=True, generator=generator)``; its order."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the iterator's base seed
    order = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)  # RandomSampler's remainder (empty for num_samples=n)
    return order


class EmbeddedDataModule(L.LightningDataModule):
    """Base class: a tensor data set split once into train and held-out validation sets.

    Args:
        batch_size: Batch size of both loaders.
        image_size: Side of the square images, in pixels.
        channels: 1 (grey) or 3 (RGB).
        val_fraction: Share of the data held out for validation and audits.
        seed: Seed of the split and of the training shuffle (:class:`EpochShuffle`: epoch ``e``
            has the same order whether the run was resumed or not).
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
        self.channels = check_choice("channels", channels, (1, 3))
        self.val_fraction = check_float(
            "val_fraction", val_fraction, low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.seed = check_int("seed", seed, low=0)
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
        """Shuffled training batches, seeded by ``(seed, epoch)`` (:class:`EpochShuffle`)."""
        assert self.train_set is not None, "call setup() first"
        return DataLoader(
            self.train_set,
            self.batch_size,
            sampler=EpochShuffle(self.train_set, seed=self.seed),
            num_workers=self.num_workers,
            # the workers' base seed, from its own stream (not the global one, not the shuffle's)
            generator=torch.Generator().manual_seed(self.seed),
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
        self.name = check_choice("name", name, ("cifar10", "mnist"))
        self.root, self.download = root, check_bool("download", download)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.image_size = check_int("image_size", image_size, low=4)

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
