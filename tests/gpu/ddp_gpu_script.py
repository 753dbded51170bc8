"""DDP with NCCL on every GPU (one process per GPU; one GPU: a 1-process DDP run)."""

from __future__ import annotations

import sys

import lightning as L
import torch
from helpers import BoringModel, all_ranks_equal, digits, end_ddp, flat_parameters, loader
from lightning.pytorch.strategies import DDPStrategy

from lightning_privacy.callbacks import GradientDefense
from lightning_privacy.defenses import GaussianNoise, GradientClipping


class Check(L.Callback):
    """After fit start: was a Python comm hook registered; at the end: are replicas equal."""

    def on_train_start(self, trainer, pl_module):
        from torch.nn.parallel import DistributedDataParallel

        ddp = trainer.strategy.model
        self.hook = isinstance(ddp, DistributedDataParallel) and ddp._comm_hooks != []

    def on_train_end(self, trainer, pl_module):
        self.equal = all_ranks_equal(flat_parameters(pl_module))


def main(out: str) -> None:
    x, y = digits(64)
    check = Check()
    defense = GradientDefense([GradientClipping(max_norm=1.0), GaussianNoise(std=0.01)], seed=0)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=torch.cuda.device_count(),
        strategy=DDPStrategy(process_group_backend="nccl"),
        precision="16-mixed",
        max_steps=3,
        callbacks=[defense, check],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringModel(batch_norm=False, dropout=0.0), loader(x, y, batch_size=8))
    if trainer.is_global_zero:
        with open(out, "w") as handle:
            handle.write(f"hook_registered={defense.placement == 'local' and check.hook}\n")
            handle.write(f"replicas_equal={check.equal}\n")


if __name__ == "__main__":
    main(sys.argv[1])
    end_ddp()
