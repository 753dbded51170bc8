"""Sweeps end to end: results.csv, Pareto PNGs, report, resume, kill-and-rerun."""

from __future__ import annotations

import base64
import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_privacy.sweep import parse_sweep_config
from lightning_privacy.sweep.pareto import (
    PARETO_PLOTS,
    epsilon_audit_figure,
    pareto_front,
    plot_pareto,
)
from lightning_privacy.sweep.runner import load_results, run_sweep

PNG = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[2]

TINY = """\
name: tiny
defenses:
  - name: none
  - name: gaussian_noise
    strengths: [0.001, 0.1]
  - name: magnitude_pruning
    strengths: [0.5, 0.99]
  - name: low_rank
    strengths: [1]
data: {image_size: 16, batch_size: 16}
training: {epochs: 1, limit_train_batches: 3}
audit: null
leakage: null
"""


def test_pareto_front_is_the_non_dominated_set():
    points = [(40.0, 0.9), (12.0, 0.85), (30.0, 0.8), (11.0, 0.3), (12.0, 0.2)]
    front = pareto_front(points)
    assert front == [3, 1, 0]
    for i in set(range(len(points))) - set(front):
        assert any(points[j][0] <= points[i][0] and points[j][1] >= points[i][1] for j in front)


def test_a_defense_keeps_its_colour_in_every_panel(tmp_path, monkeypatch):
    """ε is undefined for the non-DP trials; dropping them must not shift the DP-SGD colour."""
    import matplotlib.axes

    rows = [
        {"defense": "none", "label": "none", "val_acc": 0.9, "attack_psnr": 40.0},
        {"defense": "gaussian_noise", "label": "g", "val_acc": 0.8, "attack_psnr": 20.0},
        {"defense": "dp_sgd", "label": "dp", "val_acc": 0.7, "attack_psnr": 12.0, "epsilon": 3.0},
    ]
    drawn: list[tuple[str, str, tuple]] = []
    original = matplotlib.axes.Axes.scatter

    def spy(self, x, y, *args, **kwargs):
        if kwargs.get("label"):
            drawn.append((panel, kwargs["label"], tuple(kwargs["color"])))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", spy)
    for panel in ("attack_psnr", "epsilon"):
        plot_pareto(rows, panel, panel, tmp_path / f"{panel}.png")
    colours = {(panel, label): colour for panel, label, colour in drawn}
    assert {label for panel, label in colours if panel == "epsilon"} == {"dp_sgd"}
    assert colours[("epsilon", "dp_sgd")] == colours[("attack_psnr", "dp_sgd")]


def test_six_trial_sweep_writes_csv_plots_and_report(tmp_path):
    config = parse_sweep_config(TINY)
    assert len(config.trials()) == 6
    results = run_sweep(config, tmp_path, in_process=True, progress=False)
    assert [r["status"] for r in results] == ["ok"] * 6
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["trial_id"] for r in rows] == [t.trial_id for t in config.trials()]
    assert all(0.0 <= float(r["val_acc"]) <= 1.0 for r in rows)
    # the defenses really changed training: pruning 99 % of the gradient is not "none"
    assert rows[0]["val_acc"] != rows[4]["val_acc"] or rows[0]["seconds"] != rows[4]["seconds"]
    for name, *_ in PARETO_PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == PNG
    html = (tmp_path / "report.html").read_text()
    assert "Threat model" in html and "magnitude_pruning=0.99" in html
    # the sweep's own report opens offline: every image inline, decodable PNG, nothing fetched
    images = re.findall(r"<img\b[^>]*\bsrc=[\"']([^\"']*)[\"']", html)
    assert len(images) >= len(PARETO_PLOTS)
    for src in images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    assert not re.search(r"\b(?:src|href)=[\"'](?:https?:)?//", html)
    assert [r["trial_id"] for r in load_results(tmp_path)] == [r["trial_id"] for r in rows]


def test_the_audit_panel_draws_y_equals_x_on_its_log_axis():
    rows = [
        {"label": "dp", "epsilon": 2.0, "audited_epsilon": 4.0},
        {"label": "dp2", "epsilon": 16.0, "audited_epsilon": 0.5},
    ]
    fig = epsilon_audit_figure(rows)
    ax = fig.axes[0]
    x, y = (list(map(float, v)) for v in ax.lines[0].get_data())
    assert ax.get_xscale() == "log" and x == y
    assert len(x) >= 50  # a two-point segment on a log x axis would not be the line y = x
    # the point that breaks the guarantee is above the line at its own x
    (above,) = [p for p in ax.collections[0].get_offsets().tolist() if p[1] > p[0]]
    assert above == [2.0, 4.0]


def test_membership_columns_and_their_panels(tmp_path):
    config = parse_sweep_config(
        "defenses: [{name: none}, {name: dpsgd, strengths: [1.0], poisson_sampling: false}]\n"
        "data: {image_size: 16, batch_size: 16}\n"
        "training: {epochs: 1, limit_train_batches: 3}\n"
        "audit: null\nleakage: null\n"
        "membership: {attack: loss, num_samples: 100}\n"
    )
    results = run_sweep(config, tmp_path, in_process=True, progress=False)
    assert [r["status"] for r in results] == ["ok", "ok"]
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    for row, result in zip(rows, results, strict=True):
        # each column is the last value the trial's MembershipAudit logged
        for column, key in (
            ("mia_auc", "membership/auc"),
            ("mia_tpr_at_1pct_fpr", "membership/tpr_at_fpr_0.01"),
            ("audited_epsilon", "membership/epsilon_lower_bound"),
        ):
            assert float(row[column]) == pytest.approx(result["history"][key][-1][1])
        assert 0.0 <= float(row["mia_auc"]) <= 1.0 and float(row["audited_epsilon"]) >= 0.0
    dpsgd = rows[1]
    assert float(dpsgd["audited_epsilon"]) <= float(dpsgd["epsilon"])
    for name in ("pareto_mia_auc.png", "epsilon_audit.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    html = (tmp_path / "report.html").read_text()
    assert "accuracy vs MIA AUC" in html and "accountant ε vs audited ε" in html
    assert "<th>MIA AUC</th>" in html and "<th>audited ε</th>" in html


def test_rerun_skips_finished_trials_and_reruns_failed_ones(tmp_path):
    config = parse_sweep_config("defenses:\n  - {name: gaussian_noise, strengths: [1, 2, 3]}\n")
    calls = []

    def fake(spec, out):
        from lightning_privacy.sweep.config import TrialSpec
        from lightning_privacy.sweep.results import TrialResult, write_result

        trial = TrialSpec.from_dict(spec)
        calls.append(trial.strength)
        if trial.strength == 3 and len(calls) <= 3:
            return {"trial_id": trial.trial_id, "status": "failed: boom"}
        result = TrialResult.finished(trial, val_acc=1 / trial.strength)
        write_result(out, result)
        return result.to_dict()

    first = run_sweep(config, tmp_path, trial_fn=fake, in_process=True, progress=False)
    assert calls == [1, 2, 3] and first[2]["status"].startswith("failed")
    second = run_sweep(config, tmp_path, trial_fn=fake, in_process=True, progress=False)
    assert calls == [1, 2, 3, 3], "only the failed trial runs again"
    assert [r["status"] for r in second] == ["ok"] * 3


def _finished(out: Path) -> set[str]:
    return {p.parent.name for p in out.glob("trials/*/result.json")}


def _starts(out: Path) -> list[str]:
    log = out / "events.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.split()[2] for line in lines if line.split()[1] == "start"]


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_trials(tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text(TINY.replace("strengths: [1]", "strengths: [1, 2]") + "workers: 1\n")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "lightning_privacy",
        "sweep",
        "--config",
        str(config),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    try:
        while len(_finished(out)) < 2:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = _finished(out)
    starts_before = _starts(out)
    assert 2 <= len(done_before) < 7
    assert not (out / "results.csv").exists(), "the sweep was killed before the end"
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    starts_after = _starts(out)[len(starts_before) :]
    assert not set(starts_after) & done_before, "a finished trial was run again"
    assert len(_finished(out)) == 7
    with open(out / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 7
    assert "skipped" in rerun.stdout + rerun.stderr


# ---------------------------------------------------------------- issue 14: interrupting a sweep
SCRIPT = Path(__file__).with_name("sweep_script.py")


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _start_slow_sweep(out: Path) -> tuple[subprocess.Popen, int]:
    """The 3-trial sleeping sweep in its own session, once its first worker is training."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRIAL_SECONDS": "120"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("pids/*")):
        assert proc.poll() is None, "the sweep ended before its first trial started"
        assert time.monotonic() < deadline, "no trial started"
        time.sleep(0.05)
    time.sleep(0.2)  # the pid file is written before the trial sleeps
    return proc, int(next(out.glob("pids/*")).read_text())


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running(pid)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_issue14_item7_ctrl_c_stops_the_sweep_and_its_worker_at_once(tmp_path):
    """Item 7: Ctrl-C ran the queued trial to the end (8.9 s) before the sweep exited: Lightning
    turns SIGINT into sys.exit(1) in the worker, and the pool worker survived it."""
    config = tmp_path / "sweep.yaml"
    config.write_text(
        TINY.replace("epochs: 1, limit_train_batches: 3", "epochs: 50") + "workers: 1\n"
    )
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lightning_privacy", "sweep", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        # SIGINT at its default in the sweep, as in a terminal, even when this pytest worker
        # ignores it: Lightning sets SIG_IGN after a KeyboardInterrupt in any earlier test's fit,
        # and an ignored signal is inherited by children (the sweep then never sees Ctrl-C).
        preexec_fn=_default_sigint,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not _starts(out):
            assert proc.poll() is None and time.monotonic() < deadline, "no trial started"
            time.sleep(0.05)
        time.sleep(3)  # the first trial is training (50 epochs: minutes)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        assert proc.wait(timeout=120) == 130
        stopped = time.monotonic() - sent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert stopped < 10, f"the sweep took {stopped:.1f} s to stop"
    assert len(_starts(out)) == 1, "a queued trial started after Ctrl-C"
    assert not list(out.glob("trials/*/result.json")), "the interrupted trial wrote a result"
    assert "interrupted" in (out / "events.log").read_text()


@pytest.mark.slow
def test_issue14_item7_workers_die_with_a_killed_sweep_and_the_lock_refuses_a_second_run(
    tmp_path, monkeypatch, capsys
):
    """Item 7: after SIGKILL the workers trained on, and a rerun trained the same trials."""
    import sweep_script

    from lightning_privacy._process import LockedError
    from lightning_privacy.cli import main

    out = tmp_path / "run"
    proc, worker = _start_slow_sweep(out)
    config = parse_sweep_config(sweep_script.SWEEP)
    try:
        with pytest.raises(LockedError, match=rf"sweep \(pid {proc.pid},"):
            run_sweep(config, out, trial_fn=sweep_script.slow_trial, progress=False)
        file = tmp_path / "sweep.yaml"
        file.write_text("defenses: [{name: none}]\naudit: null\nleakage: null\n")
        assert main(["sweep", "--config", str(file), "--out", str(out)]) == 2
        assert f"pid {proc.pid}" in capsys.readouterr().err
        os.kill(proc.pid, signal.SIGKILL)  # the sweep alone, not its process group
        proc.wait(timeout=30)
        assert _gone_within(worker, 5), "the worker outlived the killed sweep"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if _running(worker):
            os.kill(worker, signal.SIGKILL)
    assert not list(out.glob("trials/*/result.json"))
    monkeypatch.setenv("TRIAL_SECONDS", "0")  # the kernel released the lock: a rerun goes ahead
    rows = run_sweep(config, out, trial_fn=sweep_script.slow_trial, in_process=True, progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 3
