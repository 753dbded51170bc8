"""What the example scripts share: the photo-patch split, a short seeded fit, mean ± std.

The scripts import it as ``_common`` (their own folder is on ``sys.path`` when run as scripts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_privacy.data import load_photo_patches
from lightning_privacy.models import LitClassifier


def photo_split(image_size: int, seed: int, patches_per_photo: int = 120) -> dict[str, Any]:
    """The embedded photo patches, 80 % training and 20 % validation by a seeded permutation."""
    x, y = load_photo_patches(
        image_size=image_size, channels=3, patches_per_photo=patches_per_photo
    )
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    return {
        "train": (x[order[:split]], y[order[:split]]),
        "val": (x[order[split:]], y[order[split:]]),
        "classes": int(y.max()) + 1,
    }


def fit_classifier(
    build: Callable[[], nn.Module],
    data: dict[str, Any],
    *,
    epochs: int,
    lr: float,
    seed: int,
    callbacks: Sequence[L.Callback] = (),
) -> LitClassifier:
    """The network ``build()`` makes after seeding, trained with Adam, batch 32, the same seeded
    data order; returned in eval mode."""
    L.seed_everything(seed, verbose=False)
    module = LitClassifier(build(), lr=lr, optimizer="adam")
    loader = DataLoader(
        TensorDataset(*data["train"]),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=list(callbacks),
        logger=False,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return module.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy without gradients."""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``"mean ± std"`` (std 0 for one value)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    spread = float(t.std()) if len(t) > 1 else 0.0
    return f"{float(t.mean()):.{digits}f} ± {spread:.{digits}f}"
