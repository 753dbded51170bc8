"""A sweep file is validated whole before anything runs: every key, then a dry run of each trial."""

from __future__ import annotations

import pytest

from lightning_privacy.cli import main
from lightning_privacy.sweep import SweepConfigError
from lightning_privacy.sweep.check import check_sweep_text

# every option error of the audit, each of which used to fail its trial at setup, outputs written
BAD = """\
defenses:
  - name: none
  - name: dpsgd
    strengths: [1.0]
    accountant: foo
    target_delta: 2.0
  - name: dpsgd
    strengths: [2.0]
    grad_sample_mode: ghost
  - name: magnitude_pruning
    strengths: [0.5]
model: {init: unifrom}
data: {image_size: 10}
leakage: {estimator: expected}
audit: {attack: token_leakage, num_samples: 100}
"""
EXPECTED = [
    (5, "defenses[1].accountant", "Expected `accountant` to be one of 'rdp', 'prv'"),
    (6, "defenses[1].target_delta", "Expected `target_delta` to be a finite float > 0.0"),
    (9, "defenses[2].grad_sample_mode", "needs per-sample losses"),
    (12, "model.init", "Expected `init` to be one of 'uniform'"),
    (13, "data.image_size", "Expected `image_size` to be divisible by 4, but got 10"),
    (14, "leakage.estimator", "for estimator='expected'"),
    (15, "audit.num_samples", "Expected `num_samples` to be <= the held-out batch size 64"),
    (15, "audit.attack", "TokenLeakage attacks text models"),
]


def test_issue14_item6_every_error_of_a_sweep_file_is_reported_before_anything_runs(
    tmp_path, capsys
):
    """Item 6: these failed each trial at its own setup, outputs already written."""
    config = tmp_path / "bad.yaml"
    config.write_text(BAD)
    out = tmp_path / "run"
    assert main(["sweep", "--config", str(config), "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == len(EXPECTED), lines
    for line, (number, key, fragment) in zip(lines, EXPECTED, strict=True):
        assert f"line {number}, key `{key}`:" in line and fragment in line, line
    assert not out.exists(), "nothing is written before the file is valid"


def test_the_dry_run_reports_a_shared_setting_once_and_trains_nothing(tmp_path):
    text = "defenses: [{name: none}, {name: gaussian_noise, strengths: [0.1, 0.2]}]\n"
    with pytest.raises(SweepConfigError) as caught:
        check_sweep_text(text + "model: {init: unifrom}\n", source="s.yaml")
    assert len(caught.value.errors) == 1
    assert "(found by a dry run of trial none)" in str(caught.value)
    assert check_sweep_text(text + "audit: null\nleakage: null\n").trials()
