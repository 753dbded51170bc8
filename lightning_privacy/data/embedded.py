"""Real image data that ships with scikit-learn and scikit-image: no download, ever.

Each loader returns ``(images, labels)`` as float tensors in ``[0, 1]`` with shape
``(N, channels, image_size, image_size)`` and int64 labels.

Example:
    >>> x, y = load_digits_tensors(image_size=32, channels=1)
    >>> tuple(x.shape), int(y.max())
    ((1797, 1, 32, 32), 9)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_privacy._validation import check_choice, check_int

PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "cat",
    "hubble_deep_field",
)


def _format_images(images: Tensor, image_size: int, channels: int) -> Tensor:
    """Resize ``(N, C, H, W)`` images in [0, 1] and convert them to 1 or 3 channels."""
    check_int("image_size", image_size, low=4)
    check_choice("channels", channels, (1, 3))
    images = images.float()
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", antialias=True
        )
    if images.shape[1] == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (images * weights).sum(1, keepdim=True)
    elif images.shape[1] == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    return images.clamp(0.0, 1.0).contiguous()


def load_digits_tensors(image_size: int = 32, channels: int = 1) -> tuple[Tensor, Tensor]:
    """The 1,797 handwritten 8x8 digits of ``sklearn.datasets.load_digits`` (10 classes).

    Example:
        >>> x, y = load_digits_tensors(image_size=16, channels=3)
        >>> tuple(x.shape[1:])
        (3, 16, 16)
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    return _format_images(images, image_size, channels), torch.from_numpy(bunch.target).long()


def load_lfw_tensors(image_size: int = 32, channels: int = 1) -> tuple[Tensor, Tensor]:
    """The 200 25x25 images of ``skimage.data.lfw_subset``: 100 faces (label 1), 100 non-faces (0).

    Faces are the privacy-sensitive case the attacks are demonstrated on.

    Example:
        >>> x, y = load_lfw_tensors()
        >>> tuple(x.shape), int(y.sum())
        ((200, 1, 32, 32), 100)
    """
    from skimage.data import lfw_subset

    raw = lfw_subset().astype(np.float32)
    raw = (raw - raw.min()) / max(float(raw.max() - raw.min()), 1e-8)
    images = torch.from_numpy(raw).unsqueeze(1)
    labels = torch.cat([torch.ones(100), torch.zeros(len(raw) - 100)]).long()
    return _format_images(images, image_size, channels), labels


def load_photo_patches(
    image_size: int = 32, channels: int = 3, patches_per_photo: int = 64, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Random square patches cut from ``skimage.data`` photos; the label is the source photo.

    Args:
        image_size: Output side in pixels.
        channels: 1 or 3.
        patches_per_photo: Patches drawn from each photo.
        seed: Seed of the patch positions.

    Example:
        >>> x, y = load_photo_patches(patches_per_photo=2)
        >>> tuple(x.shape), sorted(set(y.tolist())) == list(range(len(PHOTO_NAMES)))
        ((12, 3, 32, 32), True)
    """
    import skimage.data

    check_int("patches_per_photo", patches_per_photo, low=1)
    rng = np.random.default_rng(seed)
    patches, labels = [], []
    for label, name in enumerate(PHOTO_NAMES):
        photo = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        photo = photo / 255.0 if photo.max() > 1.0 else photo
        photo = np.repeat(photo[..., None], 3, axis=-1) if photo.ndim == 2 else photo[..., :3]
        side = min(photo.shape[:2]) // 4
        for _ in range(patches_per_photo):
            top = int(rng.integers(0, photo.shape[0] - side + 1))
            left = int(rng.integers(0, photo.shape[1] - side + 1))
            patches.append(photo[top : top + side, left : left + side].transpose(2, 0, 1).copy())
            labels.append(label)
    images = torch.stack(
        [_format_images(torch.from_numpy(p)[None], image_size, 3)[0] for p in patches]
    )
    return _format_images(images, image_size, channels), torch.tensor(labels).long()
