"""Which layer group leaks? Attacks on one group's gradient beside that group's I²F.

The attacker sees the gradient of one layer group only (stem / attention / MLP / norm / head for
the ViT; stem / conv / norm / head for the ResNet, ``layer_groups``) of a *trained* small timm
network (the victims of ``trained_victims.py``, trained to the same training accuracy), and
matches it with two objectives:

* cosine: Inverting Gradients (cosine + TV, signed Adam, ``--iterations`` steps, stages cut short
  on a plateau) -- the cosine is blind to the group gradient's scale;
* L2: DLG (L-BFGS on the squared distance), with the group's gradient and the dummy's scaled by
  the same factor so that the observed group gradient has unit norm -- without it a small
  group's objective sits below L-BFGS's tolerances from the first step.

For the ViT the stem is also attacked in closed form (``analytic_patch_embedding``). Beside the
attacks, the I²F predicted PSNR of the same group under Gaussian noise ``--i2f-std`` on it
(``std · sqrt(tr((J Jᵀ)⁻¹))``, dense), so that groups can be ranked without running attacks.
``--images`` held-out photo patches at ``--image-size`` px, label known, eval mode.

    python examples/partial_gradients.py --grid docs/partial_gradients.png   # ~40 min, 1 thread
    python examples/partial_gradients.py --quick                            # smoke run
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
    mean_std,
    photo_split,
    plateau_attack,
    print_and_save,
    single_quiet_thread,
)
from architecture_audit import closed_form_stem, trace_inverse
from rich.table import Table
from torch import nn
from trained_victims import small_resnet, small_vit

from lightning_privacy.attacks import DeepLeakage
from lightning_privacy.functional.leakage import predicted_psnr
from lightning_privacy.models.timm_models import layer_groups

MODELS = {"vit": small_vit, "resnet": lambda classes, image_size: small_resnet(classes)}


def trained(name: str, data: dict, args: argparse.Namespace) -> tuple[nn.Module, int]:
    return fit_to_accuracy(partial(MODELS[name], data["classes"], args.image_size), data, args)


def group_i2f(model: nn.Module, names: list[str], images, labels, std: float) -> str:
    values = []
    for x, y in zip(images, labels, strict=True):
        i2f = std * trace_inverse(model, x[None], y[None], names) ** 0.5
        values.append(float(predicted_psnr(i2f, x.numel())))
    return mean_std(values)


def make_table(args: argparse.Namespace) -> Table:
    table = Table(
        title=f"One layer group's gradient: cosine (IG, <= {args.iterations} steps) and L2 (DLG, "
        f"unit-norm group, <= {args.dlg_iterations} L-BFGS steps) beside the group's I²F at "
        f"noise {args.i2f_std:g}; {args.images} held-out {args.image_size} px patches, trained"
    )
    columns = ["model", "group", "params", "I²F PSNR (dB)", "cosine PSNR (dB)", "cosine SSIM"]
    columns += ["L2 PSNR (dB)", "L2 SSIM", "s"]
    return add_columns(table, columns, left=("model", "group"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--dlg-iterations", type=int, default=50)
    parser.add_argument("--patience", type=int, default=50)
    parser.add_argument("--i2f-std", type=float, default=1e-3)
    add_victim_arguments(parser, max_epochs=40)
    args = parser.parse_args()
    if args.quick:
        args.images, args.iterations, args.dlg_iterations, args.max_epochs = 2, 3, 1, 1
        args.image_size = 8
    single_quiet_thread()
    data = photo_split(args.image_size, args.seed)
    x_val, y_val = (t[: args.images] for t in data["val"])
    cosine = plateau_attack(args)
    l2 = DeepLeakage(max_iterations=args.dlg_iterations, restarts=1)
    table, grid = make_table(args), [("truth", x_val)]
    for name in args.models:
        model, epochs = trained(name, data, args)
        train_acc, val_acc = accuracy(model, *data["train"]), accuracy(model, *data["val"])
        print(f"# {name}: {epochs} epochs, acc {train_acc:.3f} / {val_acc:.3f}", flush=True)
        groups = {"all": [n for n, _ in model.named_parameters()], **layer_groups(model)}
        for group, names in groups.items():
            if not names or group == "other":
                continue
            start = time.perf_counter()
            by_cosine, rec = attack_images(model, cosine, x_val, y_val, seed=args.seed, names=names)
            by_l2, rec_l2 = attack_images(
                model, l2, x_val, y_val, seed=args.seed, names=names, scale=None
            )
            i2f = group_i2f(model, names, x_val, y_val, args.i2f_std)
            count = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
            table.add_row(
                f"{name} (train {train_acc:.2f}, val {val_acc:.2f})" if group == "all" else "",
                group,
                f"{count:,}",
                i2f,
                mean_of(by_cosine, "psnr"),
                mean_of(by_cosine, "ssim", 3),
                mean_of(by_l2, "psnr"),
                mean_of(by_l2, "ssim", 3),
                f"{time.perf_counter() - start:.0f}",
            )
            grid += [(f"{name} {group} cosine", rec), (f"{name} {group} L2", rec_l2)]
            print(
                f"# {name} {group}: I2F {i2f}, cosine {mean_of(by_cosine, 'psnr')}, "
                f"L2 {mean_of(by_l2, 'psnr')}",
                flush=True,
            )
        closed = closed_form_stem(model, x_val, y_val, torch.arange(len(x_val)))
        if closed is not None:
            scores, seconds, _ = closed
            table.add_row(
                "",
                "stem, closed form",
                "",
                "",
                mean_of(scores, "psnr"),
                mean_of(scores, "ssim", 3),
                "",
                "",
                f"{seconds:.1f}",
            )
        table.add_section()
    print_and_save(table, grid, args)


if __name__ == "__main__":
    main()
