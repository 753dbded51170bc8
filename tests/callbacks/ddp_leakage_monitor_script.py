"""LeakageMonitor under 2-process DDP (gloo, CPU); rank 0 writes a JSON report.

Launched by ``test_leakage_monitor_ddp.py`` as ``python this.py OUT.json`` (through ``ddp_launch``,
which puts ``tests/`` on ``PYTHONPATH`` for ``helpers``). Only rank 1 is given a
threshold that its estimate passes, so the stop decision must be agreed across ranks: both stop
after the first estimate, with identical replicas and identical logged values.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import lightning as L
import torch
import torch.distributed as dist
from helpers import SIGMOID_MLP, BoringModel, end_ddp, fit_ddp, loader, random_tensors

from lightning_privacy.callbacks import GradientDefense, LeakageMonitor
from lightning_privacy.defenses import GaussianNoise

torch.set_num_threads(1)
warnings.filterwarnings("ignore")


def main(out: str) -> None:
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    L.seed_everything(0, verbose=False)
    module = BoringModel(**SIGMOID_MLP, batch_norm=False, dropout=0.0)
    x, y = random_tensors(32, (1, 4, 4), num_classes=3, seed=0, label_seed=1)
    monitor = LeakageMonitor(
        every_n_train_steps=1,
        batch=(x[:2], y[:2]),
        max_predicted_psnr=-1e3 if rank == 1 else 1e4,
        on_exceed="stop",
    )
    callbacks = [GradientDefense([GaussianNoise(std=1e-2)], seed=0), monitor]
    trainer, replicas_equal = fit_ddp(callbacks, module, loader(x, y, batch_size=4), max_steps=4)
    values = torch.tensor([h["leakage/i2f"] for h in monitor.history], dtype=torch.float64)
    both = [torch.zeros_like(values) for _ in range(2)]
    dist.all_gather(both, values)
    steps = [torch.zeros(1) for _ in range(2)]
    dist.all_gather(steps, torch.tensor([float(trainer.global_step)]))
    if trainer.is_global_zero:
        report = {
            "steps": [float(s) for s in steps],
            "estimates": len(monitor.history),
            "i2f_equal": bool(torch.equal(both[0], both[1])),
            "i2f": values.tolist(),
            "replicas_equal": replicas_equal,
        }
        with open(out, "w") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1])
    end_ddp()
