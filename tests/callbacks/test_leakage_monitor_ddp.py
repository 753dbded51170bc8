"""LeakageMonitor under 2-process DDP on CPU (gloo): the stop decision is agreed across ranks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from ddp_launch import run_ddp_script

pytestmark = pytest.mark.ddp

SCRIPT = Path(__file__).with_name("ddp_leakage_monitor_script.py")


def test_stop_is_agreed_across_ranks(tmp_path):
    out = tmp_path / "report.json"
    report = run_ddp_script(SCRIPT, out)
    # only rank 1 passes its threshold, yet both ranks stop after the first estimate
    assert report["steps"] == [1.0, 1.0]
    assert report["estimates"] == 1
    assert report["replicas_equal"]
    # every rank computes the same estimate from the same held-out batch and seed
    assert report["i2f_equal"] and all(math.isfinite(v) and v > 0 for v in report["i2f"])
