"""Bad sweep input: one clear message naming the key and line, exit code 2, nothing written."""

from __future__ import annotations

import sys
import textwrap

import pytest

from lightning_privacy.cli import main
from lightning_privacy.sweep import SweepConfigError, parse_sweep_config

GOOD = """\
name: tiny
defenses:
  - name: none
  - name: gaussian_noise
    strengths: [0.01, 0.1]
  - name: magnitude_pruning
    strengths: [0.5]
training:
  epochs: 1
"""


def run_cli(tmp_path, text, *extra):
    config = tmp_path / "sweep.yaml"
    config.write_text(textwrap.dedent(text))
    out = tmp_path / "out"
    code = main(["sweep", "--config", str(config), "--out", str(out), *extra])
    return code, out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD.replace("gaussian_noise", "gausian_noise"),
            [
                "line 4",
                "defenses[1].name",
                "Unknown defense 'gausian_noise'",
                "Did you mean 'gaussian_noise'",
            ],
        ),
        (
            GOOD.replace("[0.01, 0.1]", "[0.01, -0.1]"),
            ["line 5", "defenses[1].strengths[1]", "finite float >= 0.0", "-0.1 (float)"],
        ),
        (
            GOOD.replace("    strengths: [0.5]\n", ""),
            ["line 6", "key `defenses[2]`", "Missing required key `defenses[2].strengths`"],
        ),
        ("name: x\ntraining: {epochs: 1}\n", ["key `defenses`", "Missing required key"]),
        (GOOD + "backend: slurm\n", ["line 10", "key `backend`", "'local', 'ray'", "'slurm'"]),
        (
            GOOD.replace("training:", "trainig:"),
            ["line 8", "key `trainig`", "Did you mean 'training'"],
        ),
        (GOOD.replace("epochs: 1", "epochs: 0"), ["line 9", "training.epochs", "int > 0"]),
        (GOOD + "data: {val_fraction: 1.0}\n", ["data.val_fraction", "< 1.0", "1.0 (float)"]),
        (GOOD.replace("  - name: none\n", "  - name: none\n   bad: [\n"), ["Invalid YAML"]),
        (
            GOOD.replace("  - name: none\n", "  - {name: none, strengths: [1]}\n"),
            ["line 3", "defenses[0].strengths", "takes no strengths"],
        ),
    ],
    ids=[
        "unknown-defense",
        "negative-strength",
        "missing-strengths",
        "missing-defenses",
        "unknown-backend",
        "unknown-key",
        "zero-epochs",
        "val-fraction-one",
        "yaml-syntax",
        "none-with-strengths",
    ],
)
def test_bad_config_exits_2_naming_key_and_line(tmp_path, capsys, text, expected):
    code, out = run_cli(tmp_path, text)
    err = capsys.readouterr().err
    assert code == 2
    flat = " ".join(err.split())
    for fragment in expected:
        assert fragment in flat, (fragment, err)
    assert not out.exists(), "nothing may be written for an invalid configuration"


def test_unknown_backend_on_command_line(tmp_path, capsys):
    code, out = run_cli(tmp_path, GOOD, "--backend", "slurm")
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "--backend" in err and "'slurm'" in err
    assert not out.exists()


@pytest.mark.parametrize("where", ["file", "command-line"])
def test_ray_not_installed(tmp_path, capsys, monkeypatch, where):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    if where == "file":
        code, out = run_cli(tmp_path, GOOD + "backend: ray\n")
    else:
        code, out = run_cli(tmp_path, GOOD, "--backend", "ray")
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "not installed" in err and "lightning-privacy[ray]" in err
    assert ("line 10" in err) if where == "file" else ("--backend" in err)
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    code = main(["sweep", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")])
    assert code == 2 and "nope.yaml" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_good_config_expands_grid_in_order():
    config = parse_sweep_config(GOOD)
    assert [t.label for t in config.trials()] == [
        "none",
        "gaussian_noise=0.01",
        "gaussian_noise=0.1",
        "magnitude_pruning=0.5",
    ]
    assert config.settings["training"]["epochs"] == 1
    assert config.settings["data"]["dataset"] == "digits"  # default filled in


def test_fingerprint_changes_with_settings():
    a = parse_sweep_config(GOOD).trials()[1]
    b = parse_sweep_config(GOOD.replace("epochs: 1", "epochs: 2")).trials()[1]
    assert a.label == b.label and a.trial_id != b.trial_id


def test_duplicates_are_run_once():
    text = "defenses:\n  - {name: gaussian_noise, strengths: [0.1, 0.1]}\n"
    assert len(parse_sweep_config(text).trials()) == 1


@pytest.mark.parametrize(
    ("options", "option", "expected"),
    [
        ("{max_iterations: -5}", "max_iterations", "`max_iterations`"),
        ("{nonsense: 1}", "nonsense", "Unknown argument `nonsense` for the attack"),
    ],
)
def test_bad_attack_options_are_caught_up_front(options, option, expected):
    text = f"defenses: [{{name: none}}]\naudit:\n  attack: deep_leakage\n  options: {options}\n"
    with pytest.raises(SweepConfigError) as info:
        parse_sweep_config(text)
    assert info.value.key == f"audit.options.{option}" and info.value.line == 4
    assert expected in str(info.value)


def test_error_carries_key_and_line():
    with pytest.raises(SweepConfigError) as info:
        parse_sweep_config(
            "defenses:\n  - name: dpsgd\n    strengths: [1.0]\n    max_grad_norm: 0\n"
        )
    assert info.value.key == "defenses[0].max_grad_norm" and info.value.line == 4


def test_example_sweep_config_is_valid():
    from pathlib import Path

    from lightning_privacy.sweep import load_sweep_config

    path = Path(__file__).resolve().parents[2] / "examples" / "configs" / "sweep_digits.yaml"
    config = load_sweep_config(path)
    assert len(config.trials()) >= 6
    assert {t.defense for t in config.trials()} == {
        "none",
        "gaussian_noise",
        "magnitude_pruning",
        "dpsgd",
    }


OVERRIDES = """\
defenses:
  - name: none
  - name: dpsgd
    strengths: [1.0]
    max_grad_norm: 0.5
    overrides:
      model: {lr: 0.03}
      data: {batch_size: 128}
data: {image_size: 16}
training: {epochs: 1}
"""


def test_override_changes_the_trials_module_lr_and_batch_size():
    from lightning_privacy.sweep.trial import _build_model_and_data

    none, dpsgd = parse_sweep_config(OVERRIDES).trials()
    module, datamodule = _build_model_and_data(dpsgd.settings)
    assert module.lr == 0.03 and datamodule.batch_size == 128
    shared_module, shared_data = _build_model_and_data(none.settings)
    assert shared_module.lr == 0.003 and shared_data.batch_size == 64  # others keep the shared
    assert dpsgd.settings["data"]["image_size"] == 16  # non-overridden keys stay shared
    assert dpsgd.overrides == {"data": {"batch_size": 128}, "model": {"lr": 0.03}}
    assert none.overrides == {}


def test_dotted_and_nested_overrides_are_the_same_trial():
    dotted = OVERRIDES.replace(
        "    overrides:\n      model: {lr: 0.03}\n      data: {batch_size: 128}\n",
        "    overrides: {model.lr: 0.03, data.batch_size: 128}\n",
    )
    assert dotted != OVERRIDES
    assert parse_sweep_config(dotted).trials()[1] == parse_sweep_config(OVERRIDES).trials()[1]


def test_override_is_in_the_fingerprint_and_the_stored_setup(tmp_path):
    import json

    from lightning_privacy.sweep.runner import run_sweep

    base = parse_sweep_config(OVERRIDES).trials()[1]
    other = parse_sweep_config(OVERRIDES.replace("lr: 0.03", "lr: 0.01")).trials()[1]
    assert base.label == other.label and base.trial_id != other.trial_id
    # an entry without overrides (or with an empty mapping) keeps its fingerprint
    empty = parse_sweep_config("defenses: [{name: none, overrides: {}}]").trials()[0]
    assert empty.trial_id == parse_sweep_config("defenses: [{name: none}]").trials()[0].trial_id

    def fake(spec, out):
        return {"trial_id": spec["defense"], "status": "ok", "overrides": spec["overrides"]}

    config = parse_sweep_config(OVERRIDES)
    rows = run_sweep(config, tmp_path, trial_fn=fake, in_process=True, progress=False)
    assert rows[1]["overrides"] == {"data": {"batch_size": 128}, "model": {"lr": 0.03}}
    stored = json.loads((tmp_path / "sweep.json").read_text())
    assert stored["defenses"][1]["overrides"]["model"] == {"lr": 0.03}
    assert "lr: 0.03" in (tmp_path / "report.html").read_text()  # shown in the report's setup


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "model: {lr: 0.03}",
            "model: {learning_rat: 0.03}",
            ["line 7", "defenses[1].overrides.model.learning_rat", "Unknown key"],
        ),
        (
            "data: {batch_size: 128}",
            "dat: {batch_size: 128}",
            ["line 8", "defenses[1].overrides.dat", "Did you mean 'data'"],
        ),
        (
            "data: {batch_size: 128}",
            "data: {batch_sise: 128}",
            ["line 8", "defenses[1].overrides.data.batch_sise", "Did you mean 'batch_size'"],
        ),
        (
            "model: {lr: 0.03}",
            "model: {lr: -0.03}",
            ["line 7", "defenses[1].overrides.model.lr", "finite float > 0", "-0.03 (float)"],
        ),
        (
            "data: {batch_size: 128}",
            "data: {batch_size: 12.5}",
            ["line 8", "overrides.data.batch_size", "Expected `batch_size` to be an int > 0"],
        ),
        (
            "model: {lr: 0.03}",
            "model: {optimizer: adamw}",
            ["line 7", "overrides.model.optimizer", "'sgd', 'adam'", "'adamw' (str)"],
        ),
        (
            "      model: {lr: 0.03}\n",
            "      model: 0.03\n",
            ["line 7", "defenses[1].overrides.model", "to be a mapping"],
        ),
        (
            "      data: {batch_size: 128}\n",
            "      audit: {num_samples: 2}\n",
            ["line 8", "defenses[1].overrides.audit", "Allowed: 'data', 'model', 'training'"],
        ),
        (
            "      data: {batch_size: 128}\n",
            "      model.lr: 0.01\n",
            ["line 8", "defenses[1].overrides.model.lr", "overridden twice"],
        ),
    ],
    ids=[
        "unknown-key",
        "unknown-section",
        "typo-suggestion",
        "negative-lr",
        "fractional-batch",
        "bad-choice",
        "not-a-mapping",
        "not-overridable",
        "twice",
    ],
)
def test_bad_override_exits_2_naming_key_and_line(tmp_path, capsys, old, new, expected):
    text = OVERRIDES.replace(old, new)
    assert text != OVERRIDES
    code, out = run_cli(tmp_path, text)
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert not out.exists(), "nothing may be written for an invalid configuration"


DPSGD_ENTRY = "defenses:\n  - name: dpsgd\n    strengths: [1.0]\n"


@pytest.mark.parametrize(
    ("option", "key", "fragments"),
    [
        ("accountant: foo", "defenses[0].accountant", ["`accountant`", "'rdp'", "'foo' (str)"]),
        (
            "grad_sample_mode: bogus",
            "defenses[0].grad_sample_mode",
            ["`grad_sample_mode`", "'hooks'", "'bogus' (str)"],
        ),
        ("max_grad_nrm: 1.0", "defenses[0].max_grad_nrm", ["Did you mean 'max_grad_norm'?"]),
        ("noise_multiplier: 2.0", "defenses[0].noise_multiplier", ["Unknown key"]),
        ("target_epsilon: 3.0", "defenses[0].target_epsilon", ["exactly one of"]),
    ],
    ids=["accountant", "grad-sample-mode", "typo", "strength-as-option", "two-strengths"],
)
def test_dpsgd_option_errors_are_caught_with_their_line(option, key, fragments):
    with pytest.raises(SweepConfigError) as info:
        parse_sweep_config(DPSGD_ENTRY + f"    {option}\n")
    assert info.value.key == key and info.value.line == 4
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_transform_option_error_names_the_option():
    text = "defenses:\n  - name: magnitude_pruning\n    strengths: [0.5]\n    scope: everywhere\n"
    with pytest.raises(SweepConfigError) as info:
        parse_sweep_config(text)
    assert info.value.key == "defenses[0].scope" and info.value.line == 4
    assert "'per_tensor'" in str(info.value) and "'everywhere' (str)" in str(info.value)


@pytest.mark.parametrize(
    ("section", "key", "line", "fragments"),
    [
        (
            "leakage:\n  num_samples: 1\n  estimator: bogus\n",
            "leakage.estimator",
            4,
            ["`estimator`", "'exact'", "'bogus' (str)"],
        ),
        ("leakage:\n  on_exceed: explode\n", "leakage.on_exceed", 3, ["'warn', 'stop'"]),
        ("leakage:\n  estimatr: exact\n", "leakage.estimatr", 3, ["Did you mean 'estimator'?"]),
        ("leakage:\n  seed: 3\n", "leakage.seed", 3, ["Unknown key 'seed'"]),
        ("audit:\n  num_samples: 0\n", "audit.num_samples", 3, ["`num_samples`", "0 (int)"]),
        ("audit:\n  max_seconds: -1\n", "audit.max_seconds", 3, ["`max_seconds`", "> 0.0"]),
        ("audit:\n  attack: dlg\n", "audit.attack", 3, ["Unknown attack 'dlg'"]),
        (
            "audit:\n  attack: deep_leakage\n  options: {max_iterations: 0}\n",
            "audit.options.max_iterations",
            4,
            ["`max_iterations`"],
        ),
        ("membership:\n  attack: los\n", "membership.attack", 3, ["'loss'", "'los'"]),
        (
            "membership:\n  num_samples: 5\n",
            "membership.num_samples",
            3,
            ["`num_samples`", ">= 10", "5 (int)"],
        ),
        ("membership:\n  attack: rmia\n", "membership.attack", 3, ["needs reference models"]),
    ],
    ids=[
        "estimator",
        "on-exceed",
        "typo",
        "sweep-provided",
        "audit-samples",
        "audit-seconds",
        "attack",
        "attack-option",
        "membership-attack",
        "membership-samples",
        "membership-reference",
    ],
)
def test_audit_and_leakage_errors_are_caught_with_their_line(section, key, line, fragments):
    with pytest.raises(SweepConfigError) as info:
        parse_sweep_config("defenses: [{name: none}]\n" + section)
    assert info.value.key == key and info.value.line == line
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
