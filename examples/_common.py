"""What the example scripts share: the photo-patch split, a short seeded fit, mean ± std.

The scripts import it as ``_common`` (their own folder is on ``sys.path`` when run as scripts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
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


class StopAtAccuracy(L.Callback):
    """Stop training once the training-set accuracy reaches ``target`` (checked each epoch end),
    so that victims of different architectures are attacked at a matched task accuracy."""

    def __init__(self, target: float, x: torch.Tensor, y: torch.Tensor) -> None:
        self.target, self.x, self.y = target, x, y
        self.epochs = 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs = trainer.current_epoch + 1
        was_training = pl_module.training
        pl_module.eval()
        reached = accuracy(pl_module, self.x, self.y) >= self.target
        pl_module.train(was_training)
        trainer.should_stop = trainer.should_stop or reached


def attack_images(
    model: nn.Module,
    attack: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int,
    names: Sequence[str] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    scale: float | None = 1.0,
) -> tuple[list[dict[str, float]], torch.Tensor]:
    """``attack`` on each image's own gradient (label known), seeded per image.

    ``names`` keeps only those parameters' gradients (a partial gradient); ``scale`` multiplies
    the observed gradient and the loss alike (the same matching problem, its objective scaled by
    ``scale²`` for L2 matching; ``None``: the observed gradient scaled to unit norm, per image).
    Returns the scores (PSNR, SSIM, LPIPS when cached, steps run) and
    the reconstructions.
    """
    from lightning_privacy.functional.gradients import parameter_gradients
    from lightning_privacy.metrics import reconstruction_metrics

    scores, reconstructions = [], []
    for index in range(len(images)):
        x, y = images[index : index + 1], labels[index : index + 1]
        grads = parameter_gradients(model, x, y, loss_fn=F.cross_entropy)
        kept = {n: g for n, g in grads.items() if names is None or n in set(names)}
        factor = unit_scale(kept) if scale is None else scale
        kept = {n: factor * g for n, g in kept.items()}
        rec = attack.reconstruct(
            model,
            kept,
            input_shape=tuple(x.shape[1:]),
            num_samples=1,
            labels=y,
            loss_fn=partial(scaled_loss, loss_fn, factor),
            generator=torch.Generator().manual_seed(seed + index),
        )
        inputs = rec.inputs.detach().clamp(0, 1)
        metrics = reconstruction_metrics(inputs, x, data_range=1.0)
        scores.append({k: float(v) for k, v in metrics.items() if k in ("psnr", "ssim", "lpips")})
        scores[-1]["steps"] = float(len(rec.history))
        reconstructions.append(inputs[0])
    return scores, torch.stack(reconstructions)


def unit_scale(gradients: dict[str, torch.Tensor]) -> float:
    """The factor that gives ``gradients`` unit (global L2) norm."""
    return float(torch.stack([g.pow(2).sum() for g in gradients.values()]).sum().rsqrt())


def scaled_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    factor: float,
    outputs: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """``factor * loss_fn(outputs, targets)``: its gradient is ``factor`` times the loss's."""
    return factor * loss_fn(outputs, targets)


def save_image_grid(rows: Sequence[tuple[str, torch.Tensor]], path: str) -> None:
    """One row per ``(label, images)``, truth first by convention, written as a PNG that only
    the owner can read (reconstructions are the data owner's)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(1.0 * columns + 1.6, 1.05 * len(rows)), dpi=100, squeeze=False
    )
    for (label, images), line in zip(rows, axes, strict=True):
        for ax, image in zip(line, [*images, *[None] * columns], strict=False):
            ax.axis("off")
            if image is not None:
                ax.imshow(image.clamp(0, 1).permute(1, 2, 0).numpy())
        line[0].text(
            -0.1, 0.5, label, transform=line[0].transAxes, ha="right", va="center", fontsize=7
        )
    fig.subplots_adjust(left=1.5 / (1.0 * columns + 1.6), wspace=0.05, hspace=0.05)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    os.chmod(path, 0o600)


def mean_of(scores: Sequence[dict[str, float]], key: str, digits: int = 2) -> str:
    """``mean ± std`` of one score over images, ``—`` when no image has it."""
    values = [s[key] for s in scores if key in s]
    return mean_std(values, digits) if values else "—"


def add_victim_arguments(parser: Any, *, max_epochs: int) -> None:
    """The options every trained-victim script shares: training target, optimiser, seed, grid."""
    parser.add_argument("--target-accuracy", type=float, default=0.85)
    parser.add_argument("--max-epochs", type=int, default=max_epochs)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="PNG path for the reconstructions")


def single_quiet_thread() -> None:
    """One thread, as the README's measurements ran, and Lightning's notices off."""
    import warnings

    from lightning_privacy.sweep.trial import quiet_lightning

    torch.set_num_threads(1)
    quiet_lightning()
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")


def fit_to_accuracy(build: Callable[[], nn.Module], data: dict[str, Any], args: Any) -> tuple:
    """The network ``build()`` makes, trained until its training accuracy reaches
    ``args.target_accuracy`` (at most ``args.max_epochs``); it and the epochs it took."""
    stop = StopAtAccuracy(args.target_accuracy, *data["train"])
    module = fit_classifier(
        build, data, epochs=args.max_epochs, lr=args.lr, seed=args.seed, callbacks=[stop]
    )
    return module.model.eval(), stop.epochs


def add_columns(table: Any, columns: Sequence[str], left: Sequence[str]) -> Any:
    """``columns`` added to a rich table, those in ``left`` left-aligned, the rest right."""
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    return table


def plateau_attack(args: Any) -> Any:
    """Inverting Gradients for ``args.iterations`` steps, each stage cut on an
    ``args.patience``-step plateau, by double backward (cheaper on these small networks)."""
    from lightning_privacy.attacks import InvertingGradients

    return InvertingGradients(
        max_iterations=args.iterations, patience=args.patience, method="double_backward"
    )


def print_and_save(table: Any, grid: Sequence[tuple[str, torch.Tensor]], args: Any) -> None:
    """Print the table at a fixed width; write the grid where ``--grid`` says (if it does)."""
    from rich.console import Console

    Console(width=200).print(table)
    if args.grid:
        save_image_grid(grid, args.grid)
        print(f"grid: {args.grid}")
