"""What one ``MembershipAudit`` measurement costs, in validation passes of the same run.

The promise (issue 15): one measurement with a threshold attack on 1,000 members + 1,000
non-members costs at most two validation passes over 1,000 examples -- the audit forwards the
2,000 examples once, in eval mode, without gradients, and the attack and its statistics (ROC,
AUC with its DeLong interval, TPR at low FPR, the Clopper-Pearson ε bound) are a small extra.

For each model a Lightning ``Trainer`` fits ``--epochs`` short epochs (``--train-batches``
optimizer steps each: the weights move, the cost does not depend on them) with a validation pass
over 1,000 held-out examples and one ``MembershipAudit`` measurement at the end of every epoch.
Both are timed inside the same run, so load from other processes hits them alike: the validation
pass from ``on_validation_epoch_start`` to ``on_validation_epoch_end`` (the data loader's
iteration included, as a user sees it), the measurement as the whole
``on_train_epoch_end`` hook of the callback (isolation, the forward passes, the attack, the
statistics, the logging). The first measurement of a fit is reported apart from the median of
the others (the sample is read into memory before training, in ``setup``; the first forward pass
warms the allocator). Validation and audit batch: 256. Data: random 3x32x32 images with random
labels (2,000 training, 1,000 validation): the cost of a forward pass does not depend on the
pixels, and no data set is downloaded.

Rows: a 4-layer GroupNorm CNN, torchvision ``resnet18(num_classes=10)`` and timm
``vit_tiny_patch16_224`` at ``img_size=32, patch_size=4``; attacks ``loss`` and
``modified_entropy`` (the threshold attacks), with and without the ROC image (``log_roc``, drawn
with matplotlib and sent to a ``CSVLogger`` in a temporary directory).

Usage: ``python benchmarks/membership_cost.py [--quick] [--epochs 4] [--threads 2]
[--models cnn,resnet18,vit_tiny] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from dpsgd_overhead import make_cnn  # this folder is on sys.path when run as a script
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_privacy.callbacks import MembershipAudit

BATCH = 256
VARIANTS = (("loss", False), ("loss", True), ("modified_entropy", False))


def make_model(name: str) -> nn.Module:
    """The network of a row, seeded."""
    torch.manual_seed(0)
    if name == "cnn":  # the GroupNorm CNN of dpsgd_overhead.py
        return make_cnn()
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    if name == "vit_tiny":
        import timm

        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4
        )
    raise ValueError(f"Expected a model in cnn, resnet18, vit_tiny, but got {name!r}.")


class Classifier(L.LightningModule):
    """A plain image classifier: cross-entropy, SGD, validation accuracy."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def make_loaders(num_train: int, num_val: int) -> tuple[DataLoader, DataLoader]:
    """Random images and labels (the cost does not depend on them), seeded."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(num_train + num_val, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (num_train + num_val,), generator=g)
    train = TensorDataset(x[:num_train], y[:num_train])
    val = TensorDataset(x[num_train:], y[num_train:])
    return DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=BATCH)


class ValidationTimer(L.Callback):
    """Seconds of every validation pass of the fit (sanity check excluded)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.seconds.append(time.perf_counter() - self._start)


class TimedMembershipAudit(MembershipAudit):
    """``MembershipAudit`` whose whole epoch-end hook is timed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: list[float] = []

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start = time.perf_counter()
        super().on_train_epoch_end(trainer, pl_module)
        self.seconds.append(time.perf_counter() - start)


def measure(model: str, attack: str, log_roc: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One fit: the validation passes and the measurements, timed side by side."""
    train, val = make_loaders(args.members * 2, args.members)
    audit = TimedMembershipAudit(
        attack, num_samples=args.members, batch_size=BATCH, log_roc=log_roc
    )
    timer = ValidationTimer()
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            max_epochs=args.epochs,
            limit_train_batches=args.train_batches,
            num_sanity_val_steps=0,
            callbacks=[timer, audit],
            logger=CSVLogger(root) if log_roc else False,
            accelerator=args.device,
            devices=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        trainer.fit(Classifier(make_model(model)), train, val)
    validation = statistics.median(timer.seconds)
    later = audit.seconds[1:] or audit.seconds
    history = audit.history[-1]
    return {
        "model": model,
        "attack": attack + (" + ROC image" if log_roc else ""),
        "validation": validation,
        "first": audit.seconds[0],
        "median": statistics.median(later),
        "members": history["num_members"],
        "nonmembers": history["num_nonmembers"],
    }


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The markdown table: seconds and the ratio to one validation pass of the same fit."""
    print(
        f"\nMembershipAudit cost, {rows[0]['members']} members + {rows[0]['nonmembers']} "
        f"non-members, validation pass over {args.members} examples, batch {BATCH}, "
        f"{args.device}, {torch.get_num_threads()} thread(s), {args.epochs} epochs per fit\n"
    )
    print(
        "| model | attack | validation pass (s) | measurement, median (s) | first (s) "
        "| ÷ validation pass (median) | ÷ validation pass (first) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']} | {r['attack']} | {r['validation']:.3f} | {r['median']:.3f} "
            f"| {r['first']:.3f} | {r['median'] / r['validation']:.2f} "
            f"| {r['first'] / r['validation']:.2f} |"
        )
    worst = max(r["median"] / r["validation"] for r in rows)
    print(f"\nlargest median ratio: {worst:.2f} validation passes (promise: <= 2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cnn only, 200 + 200, 2 epochs")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-batches", type=int, default=2)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="cnn,resnet18,vit_tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False here")
    if args.quick:
        args.models, args.members, args.epochs = "cnn", 200, 2
    torch.set_num_threads(args.threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    rows = []
    for model in args.models.split(","):
        for attack, log_roc in VARIANTS:
            rows.append(measure(model, attack, log_roc, args))
            r = rows[-1]
            print(
                f"  {model:9s} {r['attack']:22s} val {r['validation']:.3f} s, "
                f"audit {r['median']:.3f} s",
                flush=True,
            )
    print_table(rows, args)


if __name__ == "__main__":
    main()
