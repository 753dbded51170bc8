"""Reproduce the published gradient-inversion attacks on embedded data and print the tables.

* DLG (Zhu et al. 2019) on the sigmoid LeNet with U(-0.5, 0.5) weights, 5 LFW faces at 32 px,
  labels not given (the paper's 100-class head; faces are class 1): PSNR, recovered label, time.
* iDLG's label rule (Zhao et al. 2020) on 50 single-digit gradients (10-class LeNet).
* Inverting Gradients (Geiping et al. 2020) on the LeNet and a CIFAR-style ResNet-18 (eval mode,
  32 px, one photo patch, labels restored) with ``InvertingGradients.fast()`` (or the paper's
  preset cut to ``--ig-iterations`` with ``--ig-preset original``).
* The same DLG and IG runs when the gradient passes through GaussianNoise(std=0.1) or
  MagnitudePruning(ratio=0.9) first.
* AnalyticLinear on a face through an MLP whose first layer is linear with bias.
* TokenLeakage on TinyTransformerLM batches (tied and untied embeddings).

Usage: ``python examples/attack_reproduction.py [--quick] [--ig-preset fast|original]
[--ig-iterations N] [--sections dlg,idlg,closed,defended]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from lightning_privacy.attacks import (
    AnalyticLinear,
    DeepLeakage,
    InvertingGradients,
    TokenLeakage,
)
from lightning_privacy.data import load_digits_tensors, load_lfw_tensors, load_photo_patches
from lightning_privacy.defenses import GaussianNoise, MagnitudePruning
from lightning_privacy.functional import parameter_gradients
from lightning_privacy.functional.attacks import observed_gradients_of, restore_labels
from lightning_privacy.metrics import reconstruction_metrics
from lightning_privacy.models import LeNetDLG, TinyTransformerLM, resnet18_cifar

console = Console(width=140)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def defended(grads, defense, seed=0):
    return grads if defense is None else defense(grads, generator=gen(seed))


DEFENSES = {
    "none": None,
    "GaussianNoise(std=0.1)": GaussianNoise(std=0.1),
    "MagnitudePruning(ratio=0.9)": MagnitudePruning(ratio=0.9),
}


def dlg_faces(args) -> None:
    faces, labels = load_lfw_tensors(image_size=32, channels=1)
    faces, labels = faces[:100], labels[:100]  # the 100 faces (label 1)
    picks = [0, 17, 35, 52, 71][: args.dlg_images]
    attack = DeepLeakage(max_iterations=args.dlg_iterations)
    table = Table(title="DLG, sigmoid LeNet U(-0.5, 0.5), LFW faces 32 px, labels not given")
    for col in ("face", "PSNR (dB)", "label ok", "restarts", "match loss / ||g||^2", "seconds"):
        table.add_column(col, justify="right")
    successes = 0
    for i in picks:
        torch.manual_seed(1234)
        model = LeNetDLG(num_classes=100, channels=1, image_size=32, init="uniform")
        x, y = faces[i : i + 1], labels[i : i + 1]
        grads = observed_gradients_of(model, x, y)
        start = time.perf_counter()
        rec = attack.reconstruct(
            model, grads, input_shape=(1, 32, 32), num_samples=1, generator=gen(i)
        )
        seconds = time.perf_counter() - start
        s = reconstruction_metrics(rec, (x, y))
        gnorm = float(sum((g**2).sum() for g in grads))
        successes += s["psnr"] >= 30
        table.add_row(
            str(i),
            f"{s['psnr']:.1f}",
            "yes" if s["label_acc"] == 1 else "no",
            str(len(rec.metadata["trial_losses"])),
            f"{rec.objective / gnorm:.1e}",
            f"{seconds:.1f}",
        )
    table.caption = f"PSNR >= 30 dB on {successes}/{len(picks)} faces"
    console.print(table)


def idlg_labels(args) -> None:
    digits, labels = load_digits_tensors(image_size=32, channels=1)
    order = torch.randperm(len(digits), generator=gen(0))[: args.idlg_cases]
    hits = 0
    for k, i in enumerate(order.tolist()):
        torch.manual_seed(k)
        model = LeNetDLG(num_classes=10, channels=1, image_size=32, init="uniform")
        grads = observed_gradients_of(model, digits[i : i + 1], labels[i : i + 1])
        hits += int(restore_labels(model, grads, 1).item() == labels[i].item())
    table = Table(title="iDLG label rule, LeNet U(-0.5, 0.5), single digits")
    table.add_column("cases", justify="right")
    table.add_column("label accuracy", justify="right")
    table.add_row(str(len(order)), f"{100 * hits / len(order):.0f} %")
    console.print(table)


def defended_runs(args) -> None:
    faces, labels = load_lfw_tensors(image_size=32, channels=1)
    patches, patch_labels = load_photo_patches(image_size=32, channels=3, patches_per_photo=1)
    table = Table(title="Attacks against defended gradients (same inputs, same budget)")
    for col in ("attack", "model", "defense", "PSNR (dB)", "SSIM", "label ok", "seconds"):
        table.add_column(col, justify="right")
    torch.manual_seed(1234)
    lenet = LeNetDLG(num_classes=100, channels=1, image_size=32, init="uniform")
    x, y = faces[:1], labels[:1]
    g_lenet = observed_gradients_of(lenet, x, y)
    torch.manual_seed(0)
    resnet = resnet18_cifar(num_classes=10, channels=3).eval()
    xr, yr = patches[:1], patch_labels[:1]
    g_resnet = observed_gradients_of(resnet, xr, yr)
    ig = ig_attack(args)
    for name, defense in DEFENSES.items():
        for attack_name, attack, model, g, data, shape in (
            (
                "DLG",
                DeepLeakage(max_iterations=args.dlg_iterations),
                lenet,
                g_lenet,
                (x, y),
                (1, 32, 32),
            ),
            ("InvertingGradients", ig, lenet, g_lenet, (x, y), (1, 32, 32)),
            ("InvertingGradients", ig, resnet, g_resnet, (xr, yr), (3, 32, 32)),
        ):
            if model is resnet and name != "none" and args.quick:
                continue
            if ("DLG" if attack_name == "DLG" else "ig") not in args.defended_attacks.split(","):
                continue
            if ("resnet" if model is resnet else "lenet") not in args.defended_models.split(","):
                continue
            start = time.perf_counter()
            rec = attack.reconstruct(
                model, defended(g, defense), input_shape=shape, num_samples=1, generator=gen(0)
            )
            seconds = time.perf_counter() - start
            s = reconstruction_metrics(rec, data)
            table.add_row(
                attack_name,
                "ResNet-18 (eval)" if model is resnet else type(model).__name__,
                name,
                f"{s['psnr']:.1f}",
                f"{s['ssim']:.3f}",
                "yes" if s["label_acc"] == 1 else "no",
                f"{seconds:.1f}",
            )
    for model_name, truth in (("LeNetDLG", x), ("ResNet-18 (eval)", xr)):
        s = reconstruction_metrics(_constant_image(truth), truth)
        table.add_row(
            "no information",
            model_name,
            "constant image",
            f"{s['psnr']:.1f}",
            f"{s['ssim']:.3f}",
            "-",
            "-",
        )
    table.caption = (
        f"Inverting Gradients: {ig.max_iterations} iterations at most, "
        f"{'InvertingGradients.fast()' if args.ig_preset == 'fast' else 'paper preset'}. "
        "'no information': every pixel set to the image's own mean colour, the best an attacker "
        "without the gradient can do with one constant"
    )
    console.print(table)


def ig_attack(args) -> InvertingGradients:
    """``InvertingGradients.fast()`` (its own budget unless ``--ig-iterations``) or the paper's."""
    if args.ig_preset == "fast":
        cap = {} if args.ig_iterations is None else {"max_iterations": args.ig_iterations}
        return InvertingGradients.fast(**cap)
    return InvertingGradients.original(max_iterations=args.ig_iterations or 1000)


def _constant_image(images: torch.Tensor) -> torch.Tensor:
    """Every pixel of every image at that image's mean colour (the information-free floor)."""
    return images.mean(dim=(-2, -1), keepdim=True).expand_as(images).clone()


def analytic_and_tokens(args) -> None:
    faces, labels = load_lfw_tensors(image_size=32, channels=1)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(1024, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2)
    )
    table = Table(title="Closed-form attacks")
    for col in ("attack", "setting", "result"):
        table.add_column(col)
    x, y = faces[:1], labels[:1]
    rec = AnalyticLinear().reconstruct(
        mlp, observed_gradients_of(mlp, x, y), input_shape=(1, 32, 32), num_samples=1
    )
    psnr = reconstruction_metrics(rec, (x, y))["psnr"]
    table.add_row("AnalyticLinear", "MLP 1024-256-2, one face", f"PSNR {psnr:.1f} dB")
    for tied in (True, False):
        recalls, precisions = [], []
        for seed in range(args.token_batches):
            torch.manual_seed(seed)
            lm = TinyTransformerLM(
                vocab_size=500, d_model=64, n_layers=2, n_heads=4, max_len=32, tie_embeddings=tied
            )
            tokens = torch.randint(0, 500, (4, 32), generator=gen(seed))
            grads = parameter_gradients(lm, tokens, tokens, loss_fn=lm.loss_fn)
            rec = TokenLeakage().reconstruct(lm, grads, input_shape=(32,), num_samples=4)
            s = reconstruction_metrics(rec, tokens)
            recalls.append(s["token_recall"])
            precisions.append(s["token_precision"])
        table.add_row(
            "TokenLeakage",
            f"TinyTransformerLM V=500, 2 layers, {'tied' if tied else 'untied'}, "
            f"{args.token_batches} batches of 4x32",
            f"recall {100 * min(recalls):.0f} %, precision {100 * min(precisions):.0f} % "
            "(worst batch)",
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budgets")
    parser.add_argument("--ig-preset", choices=("fast", "original"), default="fast")
    parser.add_argument("--ig-iterations", type=int, default=None)
    parser.add_argument("--dlg-iterations", type=int, default=300)
    parser.add_argument("--sections", default="dlg,idlg,closed,defended")
    parser.add_argument("--defended-attacks", default="DLG,ig", help="rows of the defended table")
    parser.add_argument("--defended-models", default="lenet,resnet", help="its models")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.dlg_images, args.idlg_cases, args.token_batches = 5, 50, 5
    if args.quick:
        args.ig_iterations, args.dlg_iterations = 10, 30
        args.dlg_images, args.idlg_cases, args.token_batches = 1, 10, 1
    sections = args.sections.split(",")
    for name, run in (
        ("dlg", dlg_faces),
        ("idlg", idlg_labels),
        ("closed", analytic_and_tokens),
        ("defended", defended_runs),
    ):
        if name in sections:
            run(args)


if __name__ == "__main__":
    main()
