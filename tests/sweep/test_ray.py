"""The same trials on Ray Tune (skipped when the optional `ray` extra is not installed)."""

from __future__ import annotations

import csv

import pytest

from lightning_privacy.sweep import parse_sweep_config
from lightning_privacy.sweep.config import ray_available
from lightning_privacy.sweep.runner import run_sweep

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ray_available(), reason="ray[tune] not installed (optional extra)"),
]

TINY = """\
defenses:
  - name: none
  - name: gaussian_noise
    strengths: [0.1]
data: {image_size: 16, batch_size: 16}
training: {epochs: 1, limit_train_batches: 2}
audit: null
leakage: null
backend: ray
workers: 2
"""


def test_ray_backend_runs_the_same_trials_and_resumes(tmp_path):
    config = parse_sweep_config(TINY)
    results = run_sweep(config, tmp_path, progress=False)
    assert [r["status"] for r in results] == ["ok", "ok"]
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["trial_id"] for r in rows] == [t.trial_id for t in config.trials()]
    assert all(float(r["val_acc"]) >= 0 for r in rows)
    before = (tmp_path / "events.log").read_text().count(" start ")
    run_sweep(config, tmp_path, progress=False)  # everything finished: Ray is not even started
    assert (tmp_path / "events.log").read_text().count(" start ") == before == 2


def _finished(out):
    return {p.parent.name for p in out.glob("trials/*/result.json")}


def _starts(out):
    log = out / "events.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.split()[2] for line in lines if line.split()[1] == "start"]


def test_issue14_item13_killed_ray_sweep_resumes_without_redoing_finished_trials(tmp_path):
    """Item 13: the Ray backend's kill-and-rerun test (it skipped where Ray was not installed)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    config = tmp_path / "sweep.yaml"
    config.write_text(
        TINY.replace("strengths: [0.1]", "strengths: [0.01, 0.1]").replace(
            "workers: 2", "workers: 1"
        )
    )
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lightning_privacy", "sweep", "--config", str(config)]
    cmd += ["--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd,
        cwd=repo,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 400
    try:
        while len(_finished(out)) < 2:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(2)  # Ray's own processes share the driver's fate
    done_before, starts_before = _finished(out), _starts(out)
    assert len(done_before) == 2 and not (out / "results.csv").exists()
    rerun = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not set(_starts(out)[len(starts_before) :]) & done_before, "a finished trial ran again"
    assert len(_finished(out)) == 3
    assert "skipped" in rerun.stdout + rerun.stderr
