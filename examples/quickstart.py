"""Quickstart: add the privacy callbacks to the Trainer you already have.

    python examples/quickstart.py           # 5 epochs, 1-2 min on one busy CPU core
    python examples/quickstart.py --quick   # smoke run

The block between the markers is the README's first code block.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table


def main(quick: bool = False) -> dict[str, float]:
    # --8<-- [start:quickstart]
    import lightning as L

    from lightning_privacy.callbacks import GradientDefense, InversionAudit, LeakageMonitor
    from lightning_privacy.data import DigitsDataModule
    from lightning_privacy.defenses import GaussianNoise, GradientClipping
    from lightning_privacy.models import LeNetDLG, LitClassifier

    # your existing LightningModule and data (here: the DLG LeNet on embedded digits)
    model = LitClassifier(LeNetDLG(10, channels=1, image_size=32), optimizer="adam", lr=0.003)
    data = DigitsDataModule(batch_size=64)

    trainer = L.Trainer(
        max_epochs=5,
        callbacks=[
            # defends the gradient of every optimizer step (before the optimizer sees it)
            GradientDefense([GradientClipping(max_norm=1.0), GaussianNoise(std=0.01)], seed=0),
            # attacks a held-out validation batch with DLG through the same defense (bounded)
            InversionAudit("deep_leakage", every_n_epochs=5, max_seconds=30),
            # the I²F estimate of the same leakage, without running an attack
            LeakageMonitor(every_n_epochs=1),
        ],
    )
    # --8<-- [end:quickstart]
    if quick:  # smoke run: the same objects, a tiny budget
        from lightning_privacy.attacks import create_attack

        trainer = L.Trainer(
            max_epochs=1,
            limit_train_batches=3,
            limit_val_batches=1,
            logger=False,
            enable_checkpointing=False,
            callbacks=[
                trainer.callbacks[0],
                InversionAudit(create_attack("deep_leakage", max_iterations=5), every_n_epochs=1),
                LeakageMonitor(every_n_epochs=1, num_samples=1),
            ],
        )
    trainer.fit(model, data)
    # --8<-- [start:metrics]
    # validation accuracy, attack PSNR, predicted PSNR and ε on one step axis, in every logger
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    # --8<-- [end:metrics]
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Privacy callbacks in an existing Trainer.")
    parser.add_argument("--quick", action="store_true", help="smoke run")
    args = parser.parse_args()
    results = main(quick=args.quick)
    table = Table(title="quickstart: LeNet on digits, clipping + Gaussian noise")
    table.add_column("metric")
    table.add_column("value", justify="right")
    shown = ("val/acc", "attack/psnr", "attack/ssim", "leakage/predicted_psnr", "privacy/epsilon")
    for key in shown:
        table.add_row(key, f"{results[key]:.3f}" if key in results else "—")
    Console().print(table)
