"""InversionAudit under 2-process DDP: rank 0 attacks within its time bound while rank 1 waits,
training finishes with identical replicas; the default bound is half the collective timeout."""

from __future__ import annotations

from pathlib import Path

import pytest
from ddp_launch import run_ddp_script

pytestmark = pytest.mark.ddp

SCRIPT = Path(__file__).with_name("ddp_inversion_audit_script.py")


def test_rank_zero_audit_under_ddp(tmp_path):
    out = tmp_path / "report.json"
    report = run_ddp_script(SCRIPT, out)
    assert report["bound"] == pytest.approx(3.0)
    assert report["steps"] == 2 and report["audits"] == 2
    assert 0 < report["iterations"] < 100_000
    assert all(p is not None for p in report["psnr"])
    assert report["replicas_equal"]
    # rank 0's results reach every rank's callback_metrics (EarlyStopping runs on each rank)
    rank0, rank1 = report["callback_psnr_per_rank"]
    assert rank0 is not None and rank1 == rank0 == pytest.approx(report["psnr"][-1])


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
