"""Attacks on the batches clients really share: labels, Inverting Gradients, the analytic attack.

* Label restoration from the last layer (no optimisation), B = 4, 8, 16, 32, labels drawn with
  repeats from the digits (10 classes), 20 batches per size, untrained sigmoid LeNet and
  ResNet-18 (eval): exact-count accuracy (the restored multiset equals the true one) and
  per-label recall (multiset overlap / B) of the three rules of ``restore_labels``: ``count``
  (the bias-gradient count estimate, our default), ``sign`` (iDLG's negative-entry rule read on
  a batch) and ``yin`` (Yin et al.'s row minima).
* Batch reconstruction, B = 1, 4, 8, 32 px photo patches, labels not given:
  ``InvertingGradients.fast()`` against Breaching's ``invertinggradients`` preset on the same
  batch, gradient, seed and iteration budget, both order-matched to the truth (Hungarian on
  pairwise MSE) and scored by the same ``reconstruction_metrics``: PSNR mean and worst image,
  labels right (multiset), seconds.
* Train-mode BatchNorm (a small BN convnet), the client's batch statistics known: ours without
  and with the BN-statistics prior (``bn_weight=0.1``) against Breaching's preset with its
  ``deep_inversion`` regularizer at 0.1 and those statistics shared as the user's buffers (on
  which Breaching runs its copy in eval mode), B = 4, 8.
* ``AnalyticLinear`` on a fully connected model (3072-256-ReLU-10) at B = 8: rows of the first
  layer that only one sample reaches give that sample exactly.

Usage: ``python benchmarks/batch_attacks.py [--quick] [--lenet-iterations 1000]
[--resnet-iterations 150] [--sections labels,reconstruction,analytic,bn]`` (Breaching from
``pip install -e ".[benchmark]"``; without it our side only). One CPU thread.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from rich.console import Console
from rich.table import Table

from lightning_privacy.attacks import AnalyticLinear, InvertingGradients
from lightning_privacy.data import load_digits_tensors, load_photo_patches
from lightning_privacy.functional.attacks import observed_gradients_of, restore_labels
from lightning_privacy.functional.metrics import label_accuracy
from lightning_privacy.metrics import reconstruction_metrics
from lightning_privacy.models import LeNetDLG, resnet18_cifar

console = Console(width=150)
RULES = ("count", "sign", "yin")


def label_models():
    torch.manual_seed(0)
    lenet = LeNetDLG(num_classes=10, channels=1, image_size=32, init="uniform")
    torch.manual_seed(0)
    resnet = resnet18_cifar(num_classes=10, channels=1).eval()
    return {"LeNet (sigmoid)": lenet, "ResNet-18 (eval)": resnet}


def label_section(args) -> None:
    digits, labels = load_digits_tensors(image_size=32, channels=1)
    table = Table(title=f"Label restoration from the last layer, {args.label_batches} batches")
    for col in ("model", "B", *(f"{r}: exact / recall" for r in RULES)):
        table.add_column(col, justify="right")
    for name, model in label_models().items():
        for size in (4, 8, 16, 32):
            exact = dict.fromkeys(RULES, 0)
            recall = dict.fromkeys(RULES, 0.0)
            for k in range(args.label_batches):
                pick = torch.randperm(len(digits), generator=torch.Generator().manual_seed(k))
                x, y = digits[pick[:size]], labels[pick[:size]]
                grads = observed_gradients_of(model, x, y)
                for rule in RULES:
                    got = restore_labels(model, grads, size, rule=rule)
                    exact[rule] += int(got.sort().values.equal(y.sort().values))
                    recall[rule] += label_accuracy(got, y)
            n = args.label_batches
            cells = [f"{100 * exact[r] / n:.0f} % / {100 * recall[r] / n:.1f} %" for r in RULES]
            table.add_row(name, str(size), *cells)
    console.print(table)


class _Meta(dict):
    def __getattr__(self, key: str):
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err


def breaching_ig(
    model,
    grads,
    shape,
    classes: int,
    iterations: int,
    num_samples: int,
    seed: int,
    user_buffers=None,
    bn_scale: float = 0.0,
):
    """Breaching's ``invertinggradients`` preset on our gradient: (inputs, labels, seconds).

    ``user_buffers``: BatchNorm buffers the user shares (Breaching then runs its model in eval
    mode on them); ``bn_scale``: its ``deep_inversion`` regularizer (the BN prior) at that scale.
    """
    import breaching

    logging.getLogger("breaching").setLevel(logging.WARNING)
    overrides = [f"optim.max_iterations={iterations}"]
    if bn_scale > 0:
        overrides.append(f"+regularization.deep_inversion.scale={bn_scale}")
    cfg = breaching.get_attack_config("invertinggradients", overrides=overrides)
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
            buffers=None if user_buffers is None else [b.clone() for b in user_buffers],
            metadata=dict(num_data_points=num_samples, labels=None, local_hyperparams=None),
        )
    ]
    torch.manual_seed(seed)
    start = time.perf_counter()
    rec, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
    seconds = time.perf_counter() - start
    labels = rec["labels"]
    labels = labels.argmax(-1) if labels.dim() > 1 else labels
    return rec["data"].detach(), labels.reshape(-1), seconds


def batch_of(size: int):
    """``size`` 32 px patches, one per photo first (6 photos, 2 patches each)."""
    patches, labels = load_photo_patches(image_size=32, channels=3, patches_per_photo=2)
    order = torch.cat([torch.arange(0, len(patches), 2), torch.arange(1, len(patches), 2)])
    pick = order[:size]
    return patches[pick], labels[pick]


def victim(name: str):
    if name == "LeNet (sigmoid, RGB)":
        torch.manual_seed(1234)
        return LeNetDLG(num_classes=100, channels=3, image_size=32, init="uniform"), 100
    torch.manual_seed(0)
    return resnet18_cifar(num_classes=10, channels=3).eval(), 10


def scored(inputs, labels, truth):
    x, y = truth
    s = reconstruction_metrics(inputs, x)
    return s["psnr"], s["psnr_worst"], label_accuracy(labels, y)


def reconstruction_section(args, have_breaching: bool) -> None:
    table = Table(title="Batch reconstruction, Inverting Gradients, labels not given")
    for col in (
        "model",
        "B",
        "iterations",
        "ours PSNR mean / worst",
        "Br. PSNR mean / worst",
        "labels ours / Br.",
        "s ours",
        "s Br.",
    ):
        table.add_column(col, justify="right")
    budgets = {
        "LeNet (sigmoid, RGB)": args.lenet_iterations,
        "ResNet-18 (eval)": args.resnet_iterations,
    }
    for name, iterations in budgets.items():
        model, classes = victim(name)
        for size in args.batch_sizes:
            x, y = batch_of(size)
            grads = observed_gradients_of(model, x, y)
            start = time.perf_counter()
            rec = InvertingGradients.fast(max_iterations=iterations).reconstruct(
                model,
                grads,
                input_shape=(3, 32, 32),
                num_samples=size,
                generator=torch.Generator().manual_seed(args.seed),
            )
            s_ours = time.perf_counter() - start
            ours = scored(rec.inputs, rec.labels, (x, y))
            cells = ["n/a", "n/a", "n/a"]
            if have_breaching:
                data, labels, s_br = breaching_ig(
                    model, grads, (3, 32, 32), classes, iterations, size, args.seed
                )
                br = scored(data, labels, (x, y))
                cells = [f"{br[0]:.2f} / {br[1]:.2f}", f"{br[2]:.2f}", f"{s_br:.1f}"]
            row = [
                name,
                str(size),
                str(iterations),
                f"{ours[0]:.2f} / {ours[1]:.2f}",
                cells[0],
                f"{ours[2]:.2f} / {cells[1]}",
                f"{s_ours:.1f}",
                cells[2],
            ]
            console.print(" | ".join(row), style="dim")
            table.add_row(*row)
    console.print(table)


def bn_convnet():
    """A small BN convnet in train mode (3 channels, 32 px, 10 classes)."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    ).train()


def with_batch_statistics(model, x):
    """A copy of ``model`` whose BN buffers hold the batch statistics of ``x`` (known stats)."""
    import copy

    attacker = copy.deepcopy(model)
    norms = [m for m in attacker.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(m, i[0])) for m in norms]
    with torch.no_grad():
        attacker(x)
        for m in norms:
            m.running_mean.copy_(seen[m].mean([0, 2, 3]))
            m.running_var.copy_(seen[m].var([0, 2, 3], unbiased=False))
    for hook in hooks:
        hook.remove()
    return attacker


def bn_section(args, have_breaching: bool) -> None:
    """Train-mode BatchNorm, the batch statistics known: with and without the BN prior."""
    table = Table(
        title="Train-mode BatchNorm convnet, batch statistics known (bn_stats_known), "
        f"{args.bn_iterations} iterations, labels not given"
    )
    for col in ("B", "attack", "PSNR mean / worst", "labels", "seconds"):
        table.add_column(col, justify="right")
    model = bn_convnet()
    for size in (4, 8):
        x, y = batch_of(size)
        grads = observed_gradients_of(model, x, y)
        attacker = with_batch_statistics(model, x)
        for name, weight in (("ours, no prior", 0.0), ("ours, BN prior 0.1", 0.1)):
            start = time.perf_counter()
            rec = InvertingGradients.fast(
                max_iterations=args.bn_iterations, bn_weight=weight
            ).reconstruct(
                attacker,
                grads,
                input_shape=(3, 32, 32),
                num_samples=size,
                generator=torch.Generator().manual_seed(args.seed),
            )
            seconds = time.perf_counter() - start
            m, w, acc = scored(rec.inputs, rec.labels, (x, y))
            table.add_row(str(size), name, f"{m:.2f} / {w:.2f}", f"{acc:.2f}", f"{seconds:.1f}")
        if have_breaching:
            data, labels, seconds = breaching_ig(
                attacker,
                grads,
                (3, 32, 32),
                10,
                args.bn_iterations,
                size,
                args.seed,
                user_buffers=list(attacker.buffers()),
                bn_scale=0.1,
            )
            m, w, acc = scored(data, labels, (x, y))
            table.add_row(
                str(size),
                "Breaching, deep_inversion 0.1",
                f"{m:.2f} / {w:.2f}",
                f"{acc:.2f}",
                f"{seconds:.1f}",
            )
    console.print(table)


def analytic_section(args) -> None:
    table = Table(title="AnalyticLinear on a fully connected model (3072-256-ReLU-10), B = 8")
    for col in ("batch", "PSNR mean / worst", "images >= 100 dB", "rows used", "group sizes"):
        table.add_column(col, justify="right")
    x, y = batch_of(8)
    for seed in range(args.analytic_models):
        torch.manual_seed(seed)
        mlp = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(3072, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )
        labels = y % 10
        rec = AnalyticLinear().reconstruct(
            mlp, observed_gradients_of(mlp, x, labels), input_shape=(3, 32, 32), num_samples=8
        )
        s = reconstruction_metrics(rec.inputs, x)
        per_image = _per_image_psnr(rec.inputs, x)
        table.add_row(
            f"model seed {seed}",
            f"{s['psnr']:.1f} / {s['psnr_worst']:.1f}",
            f"{sum(p >= 100 for p in per_image)}/8",
            str(rec.metadata["rows_used"]),
            str(rec.metadata["group_sizes"]),
        )
    console.print(table)


def _per_image_psnr(rec: torch.Tensor, truth: torch.Tensor) -> list[float]:
    from lightning_privacy.functional.metrics import image_metrics, match_order

    matched = rec.clamp(0, 1)[match_order(rec.clamp(0, 1), truth)]
    return [
        image_metrics(matched[i : i + 1], truth[i : i + 1], match=False)["psnr"]
        for i in range(len(truth))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budgets")
    parser.add_argument("--sections", default="labels,reconstruction,analytic,bn")
    parser.add_argument("--bn-iterations", type=int, default=300)
    parser.add_argument("--lenet-iterations", type=int, default=1000)
    parser.add_argument("--resnet-iterations", type=int, default=150)
    parser.add_argument("--label-batches", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.batch_sizes, args.analytic_models = (1, 4, 8), 3
    if args.quick:
        args.lenet_iterations, args.resnet_iterations, args.label_batches = 5, 2, 2
        args.bn_iterations = 3
        args.batch_sizes, args.analytic_models = (1, 4), 1
    try:
        import breaching  # noqa: F401

        have_breaching = True
    except Exception as err:
        console.print(f"[yellow]Breaching unavailable ({type(err).__name__}); our side only.")
        have_breaching = False
    sections = args.sections.split(",")
    if "labels" in sections:
        label_section(args)
    if "analytic" in sections:
        analytic_section(args)
    if "reconstruction" in sections:
        reconstruction_section(args, have_breaching)
    if "bn" in sections:
        bn_section(args, have_breaching)


if __name__ == "__main__":
    main()
