"""The console script: `demo` prints the table and writes the report; `python -m` works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lightning_privacy.cli import build_parser, demo_config_text, main
from lightning_privacy.sweep import parse_sweep_config

REPO = Path(__file__).resolve().parents[1]


def test_demo_quick_prints_table_and_writes_report(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for column in ("val acc", "ε", "attack PSNR", "predicted PSNR", "time (s)"):
        assert column in out
    for label in ("none", "gaussian_noise=0.01", "magnitude_pruning=0.9", "dpsgd=1"):
        assert label in out
    html = (tmp_path / "report.html").read_text()
    assert "lightning-privacy demo" in html and "Threat model" in html
    assert (tmp_path / "results.csv").read_text().count("\n") == 5


def test_demo_config_covers_the_four_defenses():
    config = parse_sweep_config(demo_config_text(epochs=3, seed=0))
    assert [t.defense for t in config.trials()] == [
        "none",
        "gaussian_noise",
        "magnitude_pruning",
        "dpsgd",
    ]
    assert config.settings["audit"] is not None and config.settings["leakage"] is not None


def test_python_dash_m_help():
    result = subprocess.run(
        [sys.executable, "-m", "lightning_privacy", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    for command in ("demo", "sweep", "report"):
        assert command in result.stdout


def test_parser_rejects_unknown_command(capsys):
    try:
        build_parser().parse_args(["nope"])
    except SystemExit as exit_:
        assert exit_.code == 2
    else:  # pragma: no cover
        raise AssertionError("argparse accepted an unknown command")
