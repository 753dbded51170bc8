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
* ``layer_norm``: GroupNorm(1, C) -- LayerNorm over (C, H, W) -- instead of BatchNorm;
* ``fewer_norm``: one normalisation per block instead of two (ConvNeXt; cumulative ladder only).

With ``--cumulative`` the changes are stacked in the paper's order instead (base, + patchify,
+ GELU, + fewer activations, + fewer norms, + LayerNorm), and each step is compared with the one
before, as the paper's steps are.

Each variant is trained on the embedded photo patches (same seed, data and settings) until its
training accuracy reaches ``--target-accuracy`` (at most ``--max-epochs``; epochs and accuracies
reported), then attacked in eval mode on ``--images`` held-out images, one image per gradient,
label known, by Inverting Gradients (cosine + TV, signed Adam) with the paper's 3,000 steps,
each learning-rate stage cut short on a plateau of ``--patience`` steps (steps run reported).
PSNR / SSIM mean ± std.

    python examples/ablation_ladder.py                 # one change at a time, ~25 min, 1 thread
    python examples/ablation_ladder.py --cumulative    # the ladder, step on step
    python examples/ablation_ladder.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from _common import (
    accuracy,
    add_columns,
    add_victim_arguments,
    attack_images,
    fit_to_accuracy,
    mean_of,
    photo_split,
    plateau_attack,
    print_and_save,
    single_quiet_thread,
)
from rich.table import Table
from torch import nn

#: change -> (what it does, the paper's PSNR change for that step, dB)
VARIANTS = {
    "base": ("ResNet-like: conv stem, BatchNorm, ReLU everywhere", None),
    "patchify": ("4x4 stride-4 patchify stem", 12.97 - 10.56),
    "gelu": ("ReLU -> GELU", 12.42 - 15.43),
    "fewer_act": ("one activation per block", 29.93 - 12.42),
    "no_norm": ("no normalisation", 30.57 - 29.93),
    "fewer_norm": ("one normalisation per block", 30.57 - 29.93),
    "layer_norm": ("BatchNorm -> LayerNorm", 36.86 - 30.57),
}
#: The cumulative ladder, in the paper's order (ConvNeXt keeps one norm per block, hence
#: ``fewer_norm`` rather than ``no_norm`` before the switch to LayerNorm).
LADDER = ("base", "patchify", "gelu", "fewer_act", "fewer_norm", "layer_norm")


def norm_layer(kind: str, channels: int) -> nn.Module:
    return {
        "bn": lambda: nn.BatchNorm2d(channels),
        "ln": lambda: nn.GroupNorm(1, channels),
        "none": nn.Identity,
    }[kind]()


class Block(nn.Module):
    """Pre-activation residual block: (norm, act, conv) x 2, or one activation / norm only."""

    def __init__(self, width: int, norm: str, act: type[nn.Module], changes: frozenset) -> None:
        super().__init__()
        self.norm1 = norm_layer(norm, width)
        self.norm2 = norm_layer("none" if "fewer_norm" in changes else norm, width)
        self.act1 = nn.Identity() if "fewer_act" in changes else act()
        self.act2 = act()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act1(self.norm1(x)))
        return x + self.conv2(self.act2(self.norm2(h)))


def build(changes: frozenset, classes: int, width: int = 32) -> nn.Module:
    """The network with a set of changes from the base (seeded by the caller)."""
    norm = "none" if "no_norm" in changes else "ln" if "layer_norm" in changes else "bn"
    act = nn.GELU if "gelu" in changes else nn.ReLU
    if "patchify" in changes:
        stem = nn.Sequential(nn.Conv2d(3, width, 4, stride=4))
    else:
        stem = nn.Sequential(nn.Conv2d(3, width, 7, stride=2, padding=3), nn.MaxPool2d(3, 2, 1))
    blocks = [Block(width, norm, act, changes) for _ in range(2)]
    head = [norm_layer(norm, width), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*stem, *blocks, *head, nn.Linear(width, classes))


def changes_of(variant: str, cumulative: bool) -> frozenset:
    """One change from the base, or every ladder step up to ``variant``."""
    if not cumulative:
        return frozenset() if variant == "base" else frozenset({variant})
    return frozenset(LADDER[1 : LADDER.index(variant) + 1])


def train(changes: frozenset, data: dict, args: argparse.Namespace) -> tuple[nn.Module, int]:
    return fit_to_accuracy(partial(build, changes, data["classes"]), data, args)


def make_table(args: argparse.Namespace) -> Table:
    mode = "cumulative, the paper's order" if args.cumulative else "one change from the base"
    table = Table(
        title=f"Inverting Gradients, <= {args.iterations} steps (patience {args.patience}), "
        f"{args.images} held-out 32 px photo patches; trained to train acc >= "
        f"{args.target_accuracy} (<= {args.max_epochs} epochs); {mode}"
    )
    reference = "previous step" if args.cumulative else "base"
    columns = ["variant", "change", "epochs", "train acc", "val acc", "PSNR (dB)", "SSIM"]
    columns += [f"Δ PSNR vs {reference}", "paper's Δ for the step", "steps", "s"]
    return add_columns(table, columns, left=("variant", "change"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--cumulative", action="store_true", help="the ladder, step on step")
    add_victim_arguments(parser, max_epochs=30)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--patience", type=int, default=100)
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    args = parser.parse_args()
    if args.cumulative and any(v not in LADDER for v in args.variants or ()):
        parser.error(f"--variants: with --cumulative expected some of {list(LADDER)}")
    if args.quick:
        args.max_epochs, args.images, args.iterations = 1, 2, 5
    single_quiet_thread()
    data = photo_split(32, args.seed)
    x_val, y_val = (t[: args.images] for t in data["val"])
    attack = plateau_attack(args)
    table = make_table(args)
    grid = [("truth", x_val)]
    variants = args.variants or (
        list(LADDER) if args.cumulative else [v for v in VARIANTS if v != "fewer_norm"]
    )
    base = previous = None
    for variant in variants:
        start = time.perf_counter()
        model, epochs = train(changes_of(variant, args.cumulative), data, args)
        scores, reconstructions = attack_images(model, attack, x_val, y_val, seed=args.seed)
        psnr = sum(s["psnr"] for s in scores) / len(scores)
        base = psnr if variant == "base" else base
        reference = previous if args.cumulative else base
        change, paper = VARIANTS[variant]
        if args.cumulative and variant != "base":
            change = f"+ {change}"
        delta = "—" if reference is None or variant == "base" else f"{psnr - reference:+.2f}"
        table.add_row(
            variant,
            change,
            str(epochs),
            f"{accuracy(model, *data['train']):.3f}",
            f"{accuracy(model, *data['val']):.3f}",
            mean_of(scores, "psnr"),
            mean_of(scores, "ssim", 3),
            delta,
            "—" if paper is None else f"{paper:+.2f}",
            f"{sum(s['steps'] for s in scores) / len(scores):.0f}",
            f"{time.perf_counter() - start:.0f}",
        )
        previous = psnr
        grid.append((variant, reconstructions))
        print(f"# {variant}: PSNR {psnr:.2f} dB after {epochs} epochs", flush=True)
    print_and_save(table, grid, args)


if __name__ == "__main__":
    main()
