"""TrialResult and the files of a run directory: one format, old run directories still load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lightning_privacy.sweep import parse_sweep_config
from lightning_privacy.sweep.results import (
    NO_FORMAL_DP,
    RESULT_COLUMNS,
    TrialResult,
    load_finished,
    load_results,
    load_trial_results,
    read_results_csv,
    write_atomic,
    write_result,
    write_results_csv,
)

SPEC = parse_sweep_config(
    "defenses:\n  - {name: dpsgd, strengths: [1.0], overrides: {model.lr: 0.03}}\n"
).trials()[0]


def _finished() -> TrialResult:
    return TrialResult.finished(
        SPEC,
        val_acc=0.81,
        epsilon=6.3,
        attack_psnr=4.2,
        attack_ssim=0.01,
        predicted_psnr=-31.7,
        seconds=12.5,
        warnings=("a warning",),
        threat_model={"defended": True, "callbacks": ["DPSGD", "InversionAudit"]},
        history={"val/acc": [[10.0, 0.5], [20.0, 0.81]]},
        images=("images/reconstruction.png",),
    )


def test_trial_result_json_round_trip(tmp_path):
    result = _finished()
    path = write_result(tmp_path, result)
    stored = json.loads(path.read_text())
    assert stored == result.to_dict()
    assert list(stored)[:3] == ["trial_id", "fingerprint", "label"]  # result.json's key order
    assert stored["overrides"] == "model.lr=0.03" and stored["spec"] == SPEC.to_dict()
    assert TrialResult.from_dict(stored) == result
    assert load_finished(tmp_path, SPEC) == result
    assert load_trial_results(tmp_path) == [result]
    assert load_results(tmp_path) == [stored]


def test_infinite_epsilon_survives_the_file(tmp_path):
    none = parse_sweep_config("defenses: [{name: none}]").trials()[0]
    result = TrialResult.finished(none, epsilon=math.inf, val_acc=0.9)
    write_result(tmp_path, result)
    loaded = load_finished(tmp_path, none)
    assert loaded is not None and loaded.epsilon == math.inf and loaded.guarantee == math.inf


#: A result.json as written before TrialResult existed (with the since removed `missing`).
OLD_FORMAT = {
    "trial_id": SPEC.trial_id,
    "fingerprint": SPEC.fingerprint,
    "label": "dpsgd=1",
    "defense": "dpsgd",
    "strength": 1.0,
    "overrides": "model.lr=0.03",
    "val_acc": 0.891,
    "epsilon": 6.32,
    "attack_psnr": 4.2,
    "attack_ssim": None,
    "predicted_psnr": -31.7,
    "seconds": 38.0,
    "status": "ok",
    "missing": [],
    "warnings": ["some warning"],
    "threat_model": {"callbacks": ["DPSGD"]},
    "history": {"privacy/epsilon": [[3, 2.0], [6, 6.32]]},
    "images": [],
    "spec": SPEC.to_dict(),
}


def test_old_format_result_json_still_loads(tmp_path):
    trial = tmp_path / "trials" / SPEC.trial_id
    trial.mkdir(parents=True)
    (trial / "result.json").write_text(json.dumps(OLD_FORMAT, indent=1))
    result = load_finished(tmp_path, SPEC)
    assert result is not None, "an old run's finished trial must be skipped on rerun"
    assert (result.val_acc, result.epsilon, result.status) == (0.891, 6.32, "ok")
    assert result.warnings == ("some warning",) and result.history["privacy/epsilon"][-1] == [
        6,
        6.32,
    ]
    assert not hasattr(result, "missing")
    assert load_results(tmp_path)[0]["overrides"] == "model.lr=0.03"
    write_results_csv(load_trial_results(tmp_path), tmp_path / "results.csv")
    assert read_results_csv(tmp_path / "results.csv")[0]["epsilon"] == "6.32"


def test_a_changed_fingerprint_is_not_finished(tmp_path):
    write_result(tmp_path, _finished())
    changed = parse_sweep_config(
        "defenses:\n  - {name: dpsgd, strengths: [1.0], overrides: {model.lr: 0.01}}\n"
    ).trials()[0]
    assert load_finished(tmp_path, changed) is None


def test_failed_result_keeps_the_identity():
    failed = TrialResult.failed(SPEC, "ValueError: boom")
    assert (failed.trial_id, failed.label, failed.defense, failed.strength) == (
        SPEC.trial_id,
        "dpsgd=1",
        "dpsgd",
        1.0,
    )
    assert failed.overrides == "model.lr=0.03" and failed.status == "failed: ValueError: boom"
    assert not failed.ok and failed.fingerprint is None and failed.guarantee is None


def test_partial_dict_takes_the_identity_from_its_spec():
    result = TrialResult.from_dict(
        {"status": "ok", "overrides": {"model": {"lr": 0.03}}}, spec=SPEC
    )
    assert result.trial_id == SPEC.trial_id and result.overrides == "model.lr=0.03"
    with pytest.raises(ValueError, match="`trial_id`"):
        TrialResult.from_dict({"status": "ok"})


@pytest.mark.parametrize(
    ("defense", "epsilon", "shown"),
    [("none", None, math.inf), ("gaussian_noise", None, NO_FORMAL_DP), ("dpsgd", 2.0, 2.0)],
)
def test_the_epsilon_column(defense, epsilon, shown):
    result = TrialResult(trial_id="t", label="t", defense=defense, epsilon=epsilon)
    assert result.guarantee == shown


def test_csv_has_the_result_columns(tmp_path):
    path = write_results_csv([_finished(), TrialResult.failed(SPEC, "boom")], tmp_path / "r.csv")
    rows = read_results_csv(path)
    assert tuple(rows[0]) == RESULT_COLUMNS
    assert rows[0]["val_acc"] == "0.81" and rows[1]["val_acc"] == ""
    assert rows[1]["status"] == "failed: boom"


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old")
    write_atomic(target, "new")
    write_atomic(tmp_path / "plot.png", b"\x89PNG")
    assert target.read_text() == "new" and (tmp_path / "plot.png").read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["plot.png", "report.html"]


# ------------------------------------------------------- issue 14: corrupt or stale results
def _quick_trial(calls):
    def trial(spec, out):
        from lightning_privacy.sweep.config import TrialSpec

        spec = TrialSpec.from_dict(spec)
        calls.append(spec.label)
        result = TrialResult.finished(spec, val_acc=0.5 + spec.strength / 10)
        write_result(out, result)
        return result.to_dict()

    return trial


def test_issue14_item8_bad_results_are_named_set_aside_retrained_and_stale_ones_hidden(
    tmp_path, capsys
):
    """Item 8: truncated, `[]` and stripped files were retrained or dropped in silence (or
    crashed), a stripped one counted as finished, and an older configuration's trial showed."""
    from lightning_privacy.cli import main
    from lightning_privacy.sweep.config import TrialSpec
    from lightning_privacy.sweep.runner import run_sweep

    config = parse_sweep_config("defenses:\n  - {name: gaussian_noise, strengths: [1, 2, 3, 4]}\n")
    specs = config.trials()
    calls: list[str] = []
    run_sweep(config, tmp_path, trial_fn=_quick_trial(calls), in_process=True, progress=False)
    older = TrialSpec("none", None, {}, {"model": {"lr": 0.5}})  # left by an earlier grid
    write_result(tmp_path, TrialResult.finished(older, val_acc=0.99))
    path = [tmp_path / "trials" / s.trial_id / "result.json" for s in specs]
    path[0].write_text(path[0].read_text()[:60])  # truncated
    path[1].write_text("[]")
    path[2].write_text(json.dumps({"trial_id": specs[2].trial_id, "fingerprint": "x"}))
    reasons = [
        "not valid JSON (truncated?)",
        "expected a JSON object, but got a list",
        "keys missing: label, defense, status",
    ]

    assert main(["report", str(tmp_path)]) == 1, "a report that leaves files out says so"
    said = capsys.readouterr()
    for bad, reason in zip(path, reasons, strict=False):
        assert f"{bad}: {reason}" in said.err.replace("\n", ""), (bad, said.err)
    assert "1 trial(s) of an earlier configuration not shown" in said.out
    html = (tmp_path / "report.html").read_text()
    assert "<td>gaussian_noise=4</td>" in html and "<td>none</td>" not in html
    assert all(reason in html for reason in reasons)
    assert main(["report", str(tmp_path), "--all"]) == 1
    assert "<td>none</td>" in (tmp_path / "report.html").read_text()

    calls.clear()
    run_sweep(config, tmp_path, trial_fn=_quick_trial(calls), in_process=True, progress=False)
    assert calls == [s.label for s in specs[:3]], "the three bad ones are trained again"
    assert all((p.parent / "result.invalid.json").is_file() for p in path[:3])
    assert (tmp_path / "events.log").read_text().count(" invalid ") == 3
    assert [r.trial_id for r in load_trial_results(tmp_path)] == [s.trial_id for s in specs]


def test_a_result_of_a_newer_schema_is_refused_by_name(tmp_path):
    from lightning_privacy.sweep.results import InvalidResultError, read_result, scan_run

    path = write_result(tmp_path, TrialResult.finished(SPEC, val_acc=0.5))
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema_version": 99}))
    with pytest.raises(InvalidResultError, match=r"newer lightning-privacy \(schema version 99"):
        read_result(path)
    assert load_finished(tmp_path, SPEC) is None and scan_run(tmp_path).invalid
    assert json.loads(write_result(tmp_path, _finished()).read_text())["schema_version"] == 1
