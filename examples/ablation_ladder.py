"""Which design choice makes a network leak? The ResNet -> ConvNeXt ladder, one cause at a time.

The paper (``../shared/papers/002_*``, GIA on 14 intermediate models from ResNet-50 to ConvNeXt-T,
CIFAR-10) finds the largest PSNR jumps at: patchify stem (+2.4 dB), ReLU -> GELU (-3.0 dB),
removing activations (+17.5 dB), removing BN (+0.6 dB), BN -> LN (+6.3 dB). Here a small residual
network (32 px, width 32, two pre-activation residual blocks, global pooling, linear head) is
changed in *one* of those ways at a time from a ResNet-like base:

* ``base``: 7x7 stride-2 conv + 3x3 max-pool stem (/4), BatchNorm, ReLU after every norm;
* ``patchify``: a 4x4 stride-4 conv stem instead (same 8x8 resolution);
* ``gelu``: GELU instead of ReLU;
* ``fewer_act``: one activation per block instead of two (ConvNeXt);
* ``no_norm``: no normalisation layers;
* ``layer_norm``: GroupNorm(1, C) -- LayerNorm over (C, H, W) -- instead of BatchNorm.

Each variant is trained on the embedded photo patches (same seed, data and settings; task
accuracy reported) and then attacked in eval mode on ``--images`` held-out images, one image per
gradient, label known, by ``InvertingGradients.fast()`` (cosine + TV, signed Adam, 1,000 steps
whose stages end early on a plateau). PSNR / SSIM mean ± std.

    python examples/ablation_ladder.py            # ~10 min on one thread
    python examples/ablation_ladder.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from _common import accuracy, fit_classifier, mean_std, photo_split
from rich.console import Console
from rich.table import Table
from torch import nn

from lightning_privacy.attacks import InvertingGradients
from lightning_privacy.functional.gradients import parameter_gradients
from lightning_privacy.metrics import reconstruction_metrics
from lightning_privacy.sweep.trial import quiet_lightning

#: variant -> (what changes, the paper's PSNR change for that step, dB)
VARIANTS = {
    "base": ("ResNet-like: conv stem, BatchNorm, ReLU everywhere", None),
    "patchify": ("4x4 stride-4 patchify stem", 12.97 - 10.56),
    "gelu": ("ReLU -> GELU", 12.42 - 15.43),
    "fewer_act": ("one activation per block", 29.93 - 12.42),
    "no_norm": ("no normalisation", 30.57 - 29.93),
    "layer_norm": ("BatchNorm -> LayerNorm", 36.86 - 30.57),
}


def norm_layer(kind: str, channels: int) -> nn.Module:
    return {
        "bn": lambda: nn.BatchNorm2d(channels),
        "ln": lambda: nn.GroupNorm(1, channels),
        "none": nn.Identity,
    }[kind]()


class Block(nn.Module):
    """Pre-activation residual block: (norm, act, conv) x 2, or one activation only."""

    def __init__(self, width: int, norm: str, act: type[nn.Module], fewer: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = norm_layer(norm, width), norm_layer(norm, width)
        self.act1 = nn.Identity() if fewer else act()
        self.act2 = act()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act1(self.norm1(x)))
        return x + self.conv2(self.act2(self.norm2(h)))


def build(variant: str, classes: int, width: int = 32) -> nn.Module:
    """The network of one variant (seeded by the caller)."""
    norm = {"no_norm": "none", "layer_norm": "ln"}.get(variant, "bn")
    act = nn.GELU if variant == "gelu" else nn.ReLU
    if variant == "patchify":
        stem = nn.Sequential(nn.Conv2d(3, width, 4, stride=4))
    else:
        stem = nn.Sequential(nn.Conv2d(3, width, 7, stride=2, padding=3), nn.MaxPool2d(3, 2, 1))
    blocks = [Block(width, norm, act, variant == "fewer_act") for _ in range(2)]
    head = [norm_layer(norm, width), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*stem, *blocks, *head, nn.Linear(width, classes))


def train(variant: str, data: dict, args: argparse.Namespace) -> tuple[nn.Module, float, float]:
    network = partial(build, variant, data["classes"])
    model = fit_classifier(network, data, epochs=args.epochs, lr=args.lr, seed=args.seed).model
    return model, accuracy(model, *data["train"]), accuracy(model, *data["val"])


def attack(model: nn.Module, data: dict, args: argparse.Namespace) -> list[dict[str, float]]:
    x_val, y_val = data["val"]
    inversion = InvertingGradients.fast(max_iterations=args.iterations)
    scores = []
    for index in range(args.images):
        x, y = x_val[index : index + 1], y_val[index : index + 1]
        grads = parameter_gradients(model, x, y, loss_fn=F.cross_entropy)
        rec = inversion.reconstruct(
            model,
            grads,
            input_shape=tuple(x.shape[1:]),
            num_samples=1,
            labels=y,
            generator=torch.Generator().manual_seed(args.seed + index),
        )
        metrics = reconstruction_metrics(rec.inputs.detach().clamp(0, 1), x, data_range=1.0)
        scores.append({"psnr": float(metrics["psnr"]), "ssim": float(metrics["ssim"])})
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.images, args.iterations = 1, 2, 5
    torch.set_num_threads(1)
    quiet_lightning()
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    data = photo_split(32, args.seed)
    table = Table(
        title=f"Inverting Gradients (fast, {args.iterations} steps), {args.images} held-out "
        f"images, 32 px photos, trained {args.epochs} epochs, one change from the base each"
    )
    columns = (
        "variant",
        "change",
        "train acc",
        "val acc",
        "PSNR (dB)",
        "SSIM",
        "Δ PSNR vs base",
        "paper's Δ for the step",
        "s",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("variant", "change") else "right")
    base = None
    for variant in args.variants:
        start = time.perf_counter()
        model, train_acc, val_acc = train(variant, data, args)
        scores = attack(model, data, args)
        psnr = sum(s["psnr"] for s in scores) / len(scores)
        base = psnr if variant == "base" else base
        change, paper = VARIANTS[variant]
        delta = "—" if base is None or variant == "base" else f"{psnr - base:+.2f}"
        table.add_row(
            variant,
            change,
            f"{train_acc:.3f}",
            f"{val_acc:.3f}",
            mean_std([s["psnr"] for s in scores]),
            mean_std([s["ssim"] for s in scores], 3),
            delta,
            "—" if paper is None else f"{paper:+.2f}",
            f"{time.perf_counter() - start:.0f}",
        )
        print(f"# {variant}: acc {train_acc:.3f}/{val_acc:.3f}, PSNR {psnr:.2f} dB", flush=True)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
