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
    import csv

    with open(tmp_path / "results.csv") as handle:
        rows = {r["defense"]: r for r in csv.DictReader(handle)}
    assert list(rows) == ["none", "gaussian_noise", "magnitude_pruning", "dpsgd"]
    assert all(r["status"] == "ok" for r in rows.values())
    for row in rows.values():  # every callback measured something in every configuration
        assert float(row["attack_psnr"]) == float(row["attack_psnr"])  # a number, not NaN
        assert row["predicted_psnr"] != ""
    assert 0 < float(rows["dpsgd"]["epsilon"]) < float("inf")
    assert rows["gaussian_noise"]["epsilon"] == ""  # no formal DP, none claimed


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


def test_table_says_no_formal_dp(capsys):
    from rich.console import Console

    from lightning_privacy.cli import results_table

    rows = [
        {"trial_id": "none", "defense": "none", "val_acc": 0.9, "epsilon": float("inf")},
        {"trial_id": "gaussian_noise=0.01", "defense": "gaussian_noise", "val_acc": 0.9},
        {"trial_id": "dpsgd=1", "defense": "dpsgd", "val_acc": 0.8, "epsilon": 6.3},
    ]
    Console(width=120).print(results_table(rows, "t"))
    rows_out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    lines = {line.split("│")[1].strip(): line for line in rows_out}
    assert "no formal DP" in lines["gaussian_noise=0.01"]
    assert "∞" in lines["none"] and "6.30" in lines["dpsgd=1"]
    assert "none (no DP)" not in "".join(lines.values())
