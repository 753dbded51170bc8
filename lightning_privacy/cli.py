"""The ``lightning-privacy`` command line: ``demo`` (more subcommands arrive with their issues).

Example:
    >>> from lightning_privacy.cli import build_parser
    >>> build_parser().parse_args(["demo", "--epochs", "1"]).epochs
    1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the console script."""
    parser = argparse.ArgumentParser(prog="lightning-privacy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on embedded digits with and without defenses")
    demo.add_argument("--epochs", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def run_demo(epochs: int, seed: int, console: Console) -> Table:
    """Train LitClassifier on digits once per configuration and tabulate the results."""
    import lightning as L

    from lightning_privacy.data import DigitsDataModule
    from lightning_privacy.models import LeNetDLG, LitClassifier

    table = Table(title="lightning-privacy demo: digits, LeNet, CPU")
    for column in ("defense", "val acc", "seconds"):
        table.add_column(column)
    configurations: dict[str, list[L.Callback]] = {"none": []}
    for name, callbacks in configurations.items():
        L.seed_everything(seed, verbose=False)
        model = LitClassifier(LeNetDLG(10, channels=1, image_size=32), optimizer="adam", lr=0.003)
        trainer = L.Trainer(
            max_epochs=epochs,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        start = time.perf_counter()
        trainer.fit(model, DigitsDataModule(batch_size=64))
        acc = float(trainer.callback_metrics["val/acc"])
        table.add_row(name, f"{acc:.3f}", f"{time.perf_counter() - start:.1f}")
    console.print(table)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    console = Console()
    if args.command == "demo":
        run_demo(args.epochs, args.seed, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
