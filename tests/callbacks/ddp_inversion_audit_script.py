"""InversionAudit under 2-process DDP (gloo, CPU); rank 0 writes a JSON report.

Launched by ``test_inversion_audit_ddp.py`` as ``python this.py OUT.json``. The attack is
effectively unbounded (100,000 iterations) but ``max_seconds=3``: rank 0 attacks after every
step while rank 1 waits at the next all-reduce; training must finish with identical replicas.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_privacy.attacks import InvertingGradients
from lightning_privacy.callbacks import InversionAudit
from lightning_privacy.models import LitClassifier

torch.set_num_threads(1)
warnings.filterwarnings("ignore")


def main(out: str) -> None:
    L.seed_everything(0, verbose=False)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 64, 10),
    )
    module = LitClassifier(net, lr=0.1)
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))
    audit = InversionAudit(
        InvertingGradients(max_iterations=100_000),
        every_n_train_steps=1,
        batch=(x[:2], y[:2]),
        max_seconds=3.0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo"),
        max_steps=2,
        callbacks=[audit],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    seen = trainer.callback_metrics.get("attack/psnr")
    psnr_per_rank = [None, None]
    dist.all_gather_object(psnr_per_rank, None if seen is None else float(seen))
    if trainer.is_global_zero:
        report = {
            "bound": audit._bound,
            "audits": len(audit.history),
            "iterations": audit.last.metadata["iterations"] if audit.last else 0,
            "psnr": [h.get("attack/psnr") for h in audit.history],
            "replicas_equal": bool(torch.equal(gathered[0], gathered[1])),
            "callback_psnr_per_rank": psnr_per_rank,
            "steps": trainer.global_step,
            "seconds": time.perf_counter() - start,
        }
        with open(out, "w") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1])
