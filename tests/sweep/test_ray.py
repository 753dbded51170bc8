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
