"""LightningCLI entry point: any LightningModule / DataModule and the privacy callbacks from YAML.

    python examples/lightning_cli.py fit --config examples/configs/defended_digits.yaml
    python examples/lightning_cli.py fit --config examples/configs/defended_digits.yaml \
        --trainer.fast_dev_run=true
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


def cli_main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_main()
