"""InversionAudit under 2-process DDP: rank 0 attacks within its time bound while rank 1 waits,
training finishes with identical replicas; the default bound is half the collective timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ddp

SCRIPT = Path(__file__).with_name("ddp_inversion_audit_script.py")


def test_rank_zero_audit_under_ddp(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["bound"] == pytest.approx(3.0)
    assert report["steps"] == 2 and report["audits"] == 2
    assert 0 < report["iterations"] < 100_000
    assert all(p is not None for p in report["psnr"])
    assert report["replicas_equal"]


def test_default_bound_is_half_the_collective_timeout():
    from datetime import timedelta
    from types import SimpleNamespace

    import torch

    from lightning_privacy.callbacks import InversionAudit

    audit = InversionAudit(batch=(torch.rand(2, 1, 4, 4), torch.tensor([0, 1])))
    trainer = SimpleNamespace(
        world_size=2, strategy=SimpleNamespace(_timeout=timedelta(seconds=12)), callbacks=[]
    )
    module = torch.nn.Linear(1, 1)
    module.device = torch.device("cpu")
    audit.setup(trainer, module, "fit")
    assert audit._bound == pytest.approx(6.0)
    assert audit._attack().max_seconds == pytest.approx(6.0)
