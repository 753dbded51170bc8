"""LeakageMonitor under 2-process DDP on CPU (gloo): the stop decision is agreed across ranks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ddp

SCRIPT = Path(__file__).with_name("ddp_leakage_monitor_script.py")


def test_stop_is_agreed_across_ranks(tmp_path):
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
    # only rank 1 passes its threshold, yet both ranks stop after the first estimate
    assert report["steps"] == [1.0, 1.0]
    assert report["estimates"] == 1
    assert report["replicas_equal"]
    # every rank computes the same estimate from the same held-out batch and seed
    assert report["i2f_equal"] and all(math.isfinite(v) and v > 0 for v in report["i2f"])
