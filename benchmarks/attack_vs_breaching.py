"""Our DLG and Inverting Gradients against Breaching's on the same model, image, budget, seed.

Breaching (``pip install -e ".[benchmark]"``, PyPI ``breaching==0.1.2``) is driven through its
attack API with a server payload and shared data built here from our model, image and gradient
-- no case, dataset or download: ``breaching.attacks.prepare_attack(model, loss, cfg_attack)``
then ``attacker.reconstruct(server_payload, shared_data, {})``. Both sides use one CPU thread,
the same seed, labels not given, and are scored by the same ``reconstruction_metrics``.

* DLG: sigmoid LeNet with U(-0.5, 0.5) weights (100-class head), LFW faces at 32 px. Breaching's
  ``deepleakage`` preset (L-BFGS lr 1, randn start, 1,200 steps); ours: ``DeepLeakage()``
  (L-BFGS with strong-Wolfe line search, start in [0, 1], up to 4 restarts x 300 steps = the same
  1,200-step budget, stopping at a relative matching loss of 1e-8).
* Inverting Gradients: CIFAR-style ResNet-18 in eval mode, one 32 px photo patch; Breaching's
  ``invertinggradients`` preset and ours (same TV weight 0.2), both cut to ``--ig-iterations``.

Usage: ``python benchmarks/attack_vs_breaching.py [--quick] [--faces 5] [--ig-iterations 2000]``
(the full run takes about 35 min on one thread).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lightning_privacy.attacks import DeepLeakage, InvertingGradients
from lightning_privacy.data import load_lfw_tensors, load_photo_patches
from lightning_privacy.functional.attacks import observed_gradients_of
from lightning_privacy.metrics import reconstruction_metrics
from lightning_privacy.models import LeNetDLG, resnet18_cifar

console = Console(width=140)


class _Meta(dict):
    """Breaching reads its metadata both as ``meta.key`` and ``meta["key"]``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err


def breaching_attack(
    name: str, model, grads, shape, classes: int, iterations: int | None, seed: int
):
    """Run Breaching's preset ``name`` on our gradient; returns (inputs, labels, seconds)."""
    import breaching

    logging.getLogger("breaching").setLevel(logging.WARNING)
    overrides = [] if iterations is None else [f"optim.max_iterations={iterations}"]
    cfg = breaching.get_attack_config(name, overrides=overrides)
    setup = dict(device=torch.device("cpu"), dtype=torch.float)
    attacker = breaching.attacks.prepare_attack(model, torch.nn.CrossEntropyLoss(), cfg, setup)
    meta = _Meta(shape=tuple(shape), modality="vision", task="classification", classes=classes)
    payload = [
        dict(
            parameters=[p.detach().clone() for p in model.parameters()],
            buffers=[b.detach().clone() for b in model.buffers()],
            metadata=meta,
        )
    ]
    shared = [
        dict(
            gradients=[g.clone() for g in grads],
            buffers=None,
            metadata=dict(num_data_points=1, labels=None, local_hyperparams=None),
        )
    ]
    torch.manual_seed(seed)
    start = time.perf_counter()
    rec, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
    seconds = time.perf_counter() - start
    labels = rec["labels"]
    labels = labels.argmax(-1) if labels.dim() > 1 else labels
    return rec["data"].detach(), labels.reshape(-1), seconds


def row(table: Table, case: str, ours, theirs, truth) -> tuple[float, float]:
    x, y = truth
    s_ours = reconstruction_metrics(ours[0], (x, y))
    s_ours["label_acc"] = float(ours[1].reshape(-1)[0] == y[0])
    if theirs is None:
        table.add_row(
            case,
            f"{s_ours['psnr']:.1f}",
            "n/a",
            str(int(s_ours["label_acc"])),
            "n/a",
            f"{ours[2]:.1f}",
            "n/a",
            "n/a",
        )
        return ours[2], float("nan")
    s_theirs = reconstruction_metrics(theirs[0], (x, y))
    s_theirs["label_acc"] = float(theirs[1].reshape(-1)[0] == y[0])
    table.add_row(
        case,
        f"{s_ours['psnr']:.1f}",
        f"{s_theirs['psnr']:.1f}",
        "yes" if s_ours["label_acc"] else "no",
        "yes" if s_theirs["label_acc"] else "no",
        f"{ours[2]:.1f}",
        f"{theirs[2]:.1f}",
        f"{ours[2] / theirs[2]:.2f}",
    )
    return ours[2], theirs[2]


def new_table(title: str) -> Table:
    table = Table(title=title)
    for col in (
        "case",
        "PSNR ours",
        "PSNR Breaching",
        "label ours",
        "label Breaching",
        "s ours",
        "s Breaching",
        "time ratio",
    ):
        table.add_column(col, justify="right")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 face, tiny budgets")
    parser.add_argument("--faces", type=int, default=5)
    parser.add_argument("--dlg-iterations", type=int, default=1200, help="Breaching's L-BFGS steps")
    parser.add_argument("--ig-iterations", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.faces, args.dlg_iterations, args.ig_iterations = 1, 60, 5
    try:
        import breaching  # noqa: F401

        have_breaching = True
    except Exception as err:
        console.print(
            f"[yellow]Breaching unavailable ({type(err).__name__}: {err}); our side only."
        )
        have_breaching = False

    faces, labels = load_lfw_tensors(image_size=32, channels=1)
    picks = [0, 17, 35, 52, 71][: args.faces]
    table = new_table(
        f"DLG, LeNet U(-0.5, 0.5), LFW faces 32 px, labels not given, "
        f"budget {args.dlg_iterations} L-BFGS steps"
    )
    ours_total = theirs_total = 0.0
    ours_dlg = DeepLeakage(max_iterations=args.dlg_iterations // 4, restarts=4)
    for i in picks:
        torch.manual_seed(1234)
        model = LeNetDLG(num_classes=100, channels=1, image_size=32, init="uniform")
        x, y = faces[i : i + 1], labels[i : i + 1]
        grads = observed_gradients_of(model, x, y)
        start = time.perf_counter()
        rec = ours_dlg.reconstruct(
            model,
            grads,
            input_shape=(1, 32, 32),
            num_samples=1,
            generator=torch.Generator().manual_seed(args.seed),
        )
        ours = (rec.inputs, rec.labels, time.perf_counter() - start)
        theirs = None
        if have_breaching:
            theirs = breaching_attack(
                "deepleakage", model, grads, (1, 32, 32), 100, args.dlg_iterations, args.seed
            )
        a, b = row(table, f"face {i}", ours, theirs, (x, y))
        ours_total, theirs_total = ours_total + a, theirs_total + b
    if have_breaching and theirs_total > 0:
        table.caption = f"total time ratio ours/Breaching: {ours_total / theirs_total:.2f}"
    if picks:
        console.print(table)

    patches, patch_labels = load_photo_patches(image_size=32, channels=3, patches_per_photo=1)
    torch.manual_seed(0)
    resnet = resnet18_cifar(num_classes=10, channels=3).eval()
    x, y = patches[:1], patch_labels[:1]
    grads = observed_gradients_of(resnet, x, y)
    table = new_table(
        f"Inverting Gradients, ResNet-18 (eval), one 32 px patch, labels not given, "
        f"{args.ig_iterations} iterations"
    )
    start = time.perf_counter()
    rec = InvertingGradients(max_iterations=args.ig_iterations).reconstruct(
        resnet,
        grads,
        input_shape=(3, 32, 32),
        num_samples=1,
        generator=torch.Generator().manual_seed(args.seed),
    )
    ours = (rec.inputs, rec.labels, time.perf_counter() - start)
    theirs = None
    if have_breaching:
        theirs = breaching_attack(
            "invertinggradients", resnet, grads, (3, 32, 32), 10, args.ig_iterations, args.seed
        )
    a, b = row(table, "patch 0", ours, theirs, (x, y))
    if have_breaching:
        table.caption = (
            f"per iteration: ours {a / args.ig_iterations:.3f} s, "
            f"Breaching {b / args.ig_iterations:.3f} s"
        )
    console.print(table)


if __name__ == "__main__":
    main()
