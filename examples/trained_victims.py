"""Does the architecture decide the leak? Small timm victims, trained to a matched accuracy.

The paper (``../shared/papers/002_*``) attacks *trained* models at matched accuracy and
over-fitting. Here three small timm networks -- sized for a 2-core CPU, see ``ARCHITECTURES`` --
are each trained on the embedded photo patches (32 px, 6 classes, 576 training and 144
validation patches) with the same seed and optimiser until their training accuracy reaches
``--target-accuracy`` (or ``--max-epochs``), then attacked in eval mode; the untrained network
(the same seeded initialisation) is attacked too, since that is what an audit in the first
steps of training sees. The attack is Inverting Gradients (cosine + TV, signed Adam at lr 0.1,
step decay) with the paper's 3,000 iterations, each learning-rate stage cut short when the
objective has not improved by 0.1 % in ``--patience`` steps (the steps run are reported), one
held-out image per gradient, the label known, the same ``--images`` images for every row.

    python examples/trained_victims.py --grid docs/trained_victims.png   # ~1 h on one thread
    python examples/trained_victims.py --quick                          # smoke run
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

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
from timm.models.convnext import ConvNeXt
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lightning_privacy.metrics import reconstruction_metrics


def small_resnet(classes: int) -> nn.Module:
    """timm ResNet, one BasicBlock per stage, widths 16-128, a 3x3 stride-2 stem, BatchNorm."""
    model = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=classes, channels=(16, 32, 64, 128))
    model.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def small_convnext(classes: int) -> nn.Module:
    """timm ConvNeXt, one block per stage, dims 32-256, 4x4 patchify stem, LayerNorm, GELU."""
    return ConvNeXt(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), num_classes=classes)


def small_vit(classes: int, image_size: int = 32) -> nn.Module:
    """timm ViT, patch 4 (64 tokens at 32 px), width 64, depth 4, 2 heads, class token."""
    return VisionTransformer(
        img_size=image_size, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=classes
    )


#: name -> (what it is, builder)
ARCHITECTURES: dict[str, tuple[str, Callable[[int], nn.Module]]] = {
    "resnet": ("ResNet (BasicBlock x4, 16-128)", small_resnet),
    "convnext": ("ConvNeXt (1 block x4, 32-256)", small_convnext),
    "vit": ("ViT (patch 4, width 64, depth 4)", small_vit),
}


def victims(name: str, data: dict, args: argparse.Namespace) -> list[tuple[str, nn.Module, str]]:
    """The untrained and the trained network of one architecture, with the epochs trained."""
    build = ARCHITECTURES[name][1]
    torch.manual_seed(args.seed)
    untrained = build(data["classes"]).eval()
    model, epochs = fit_to_accuracy(lambda: build(data["classes"]), data, args)
    return [("untrained", untrained, "0"), ("trained", model, str(epochs))]


def make_table(args: argparse.Namespace) -> Table:
    table = Table(
        title=f"Inverting Gradients, <= {args.iterations} steps (patience {args.patience}), "
        f"{args.images} held-out 32 px photo patches, label known, eval mode; trained to train "
        f"acc >= {args.target_accuracy} (<= {args.max_epochs} epochs, Adam {args.lr}, batch 32)"
    )
    columns = ["architecture", "params", "state", "epochs", "train acc", "val acc", "gap"]
    columns += ["PSNR (dB)", "SSIM", "LPIPS", "steps", "s"]
    return add_columns(table, columns, left=("architecture", "state"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--patience", type=int, default=100)
    add_victim_arguments(parser, max_epochs=40)
    args = parser.parse_args()
    for name in args.architectures:
        if name not in ARCHITECTURES:
            parser.error(f"--architectures: expected some of {list(ARCHITECTURES)}, got {name!r}")
    if args.quick:
        args.images, args.iterations, args.max_epochs = 2, 4, 1
    single_quiet_thread()
    data = photo_split(32, args.seed)
    x_val, y_val = (t[: args.images] for t in data["val"])
    attack = plateau_attack(args)
    table = make_table(args)
    grid = [("truth", x_val)]
    grey = [reconstruction_metrics(torch.full_like(x, 0.5)[None], x[None]) for x in x_val]
    table.add_row(
        "reference: grey image",
        "—",
        "—",
        "—",
        "—",
        "—",
        "—",
        mean_of([{"psnr": float(g["psnr"])} for g in grey], "psnr"),
        mean_of([{"ssim": float(g["ssim"])} for g in grey], "ssim", 3),
        "—",
        "—",
        "—",
        end_section=True,
    )
    for name in args.architectures:
        for state, model, epochs in victims(name, data, args):
            start = time.perf_counter()
            scores, reconstructions = attack_images(model, attack, x_val, y_val, seed=args.seed)
            train_acc, val_acc = accuracy(model, *data["train"]), accuracy(model, *data["val"])
            params = sum(p.numel() for p in model.parameters())
            table.add_row(
                ARCHITECTURES[name][0] if state == "untrained" else "",
                f"{params:,}",
                state,
                epochs,
                f"{train_acc:.3f}",
                f"{val_acc:.3f}",
                f"{train_acc - val_acc:+.3f}",
                mean_of(scores, "psnr"),
                mean_of(scores, "ssim", 3),
                mean_of(scores, "lpips", 3),
                f"{sum(s['steps'] for s in scores) / len(scores):.0f}",
                f"{time.perf_counter() - start:.0f}",
            )
            grid.append((f"{name} {state}", reconstructions))
            print(f"# {name} {state}: PSNR {mean_of(scores, 'psnr')} dB", flush=True)
        table.add_section()
    print_and_save(table, grid, args)


if __name__ == "__main__":
    main()
