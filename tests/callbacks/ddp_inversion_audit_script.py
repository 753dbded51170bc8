"""InversionAudit under 2-process DDP (gloo, CPU); rank 0 writes a JSON report.

Launched by ``test_inversion_audit_ddp.py`` as ``python this.py OUT.json`` (through ``ddp_launch``,
which puts ``tests/`` on ``PYTHONPATH`` for ``helpers``). The attack is
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
from helpers import BoringModel, end_ddp, fit_ddp, loader, random_tensors

from lightning_privacy.attacks import InvertingGradients
from lightning_privacy.callbacks import InversionAudit

torch.set_num_threads(1)
warnings.filterwarnings("ignore")


def main(out: str) -> None:
    L.seed_everything(0, verbose=False)
    module = BoringModel(dropout=0.0)
    x, y = random_tensors(32, (1, 8, 8), num_classes=10, seed=0, label_seed=1)
    audit = InversionAudit(
        InvertingGradients(max_iterations=100_000),
        every_n_train_steps=1,
        batch=(x[:2], y[:2]),
        max_seconds=3.0,
    )
    start = time.perf_counter()
    trainer, replicas_equal = fit_ddp([audit], module, loader(x, y, batch_size=4), max_steps=2)
    seen = trainer.callback_metrics.get("attack/psnr")
    psnr_per_rank = [None, None]
    dist.all_gather_object(psnr_per_rank, None if seen is None else float(seen))
    if trainer.is_global_zero:
        report = {
            "bound": audit._bound,
            "audits": len(audit.history),
            "iterations": audit.last.metadata["iterations"] if audit.last else 0,
            "psnr": [h.get("attack/psnr") for h in audit.history],
            "replicas_equal": replicas_equal,
            "callback_psnr_per_rank": psnr_per_rank,
            "steps": trainer.global_step,
            "seconds": time.perf_counter() - start,
        }
        with open(out, "w") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1])
    end_ddp()
