"""The membership audit with reference models: its file, its cache, its view of the pool."""

import dataclasses
import json

import pytest
import torch

from lightning_privacy.sweep import membership as audit_module
from lightning_privacy.sweep.config import SweepConfigError
from lightning_privacy.sweep.membership import (
    audit_target,
    inclusion_mask,
    load_pool,
    parse_membership_config,
    run_membership_audit,
)

TINY = """
name: tiny
data: {dataset: digits, image_size: 8, population: 97}
model: {name: mlp, width: 16, depth: 1}
training: {epochs: 1, batch_size: 64}
reference_models: 3
attacks: [loss, modified_entropy, lira_offline, rmia]
"""


def test_every_problem_of_the_file_is_reported_at_once_with_line_and_key():
    text = """name: bad
data: {dataset: cifar, image_size: 0}
model: {name: mlp, widht: 3}
target: {defense: dpsgd}
reference_models: 0
attacks: [loss, lira_offline, los]
workers: 0
"""
    with pytest.raises(SweepConfigError) as info:
        parse_membership_config(text, source="audit.yaml")
    found = {(e.key, e.line) for e in info.value.errors}
    assert found == {
        ("data.dataset", 2),
        ("data.image_size", 2),
        ("model.widht", 3),
        ("target", 4),
        ("attacks[1]", 6),
        ("attacks[2]", 6),
        ("workers", 7),
    }
    message = str(info.value)
    assert "audit.yaml, line 2, key `data.dataset`: Expected `dataset` to be one of" in message
    assert "Did you mean 'loss'?" in message
    assert "needs reference models: set `reference_models` to at least 2" in message
    assert "exactly one of `noise_multiplier` and `target_epsilon`" in message


def test_the_accelerator_is_checked_before_anything_trains():
    with pytest.raises(SweepConfigError) as info:
        parse_membership_config("training: {accelerator: tpu}")
    assert info.value.key == "training.accelerator" and "'cpu', 'cuda'" in str(info.value)
    assert parse_membership_config("reference_models: 2").settings["training"]["accelerator"] == (
        "cpu"
    )
    if torch.cuda.is_available():
        assert parse_membership_config("training: {accelerator: cuda}") is not None
    else:
        with pytest.raises(SweepConfigError, match=r"is_available\(\) is False"):
            parse_membership_config("training: {accelerator: cuda}")


def test_models_cached_before_the_accelerator_key_keep_their_fingerprint():
    task = parse_membership_config("reference_models: 2").tasks()[1]
    assert task.settings["training"]["accelerator"] == "cpu"
    training = {k: v for k, v in task.settings["training"].items() if k != "accelerator"}
    older = dataclasses.replace(task, settings={**task.settings, "training": training})
    assert older.fingerprint == task.fingerprint
    on_gpu = {**task.settings, "training": {**training, "accelerator": "cuda"}}
    assert dataclasses.replace(task, settings=on_gpu).fingerprint != task.fingerprint


def test_without_reference_models_the_default_attacks_are_the_threshold_ones():
    config = parse_membership_config("reference_models: 0")
    assert config.attacks == ("loss", "confidence", "entropy", "modified_entropy")
    assert [t.label for t in config.tasks()] == ["target"]


def test_the_pool_halves_and_the_population():
    data = parse_membership_config(TINY).settings["data"]
    pool_x, _, pop_x, _ = load_pool(data)
    assert len(pool_x) == 1797 - 97 and len(pop_x) == 97
    masks = [inclusion_mask(len(pool_x), 0, k) for k in range(4)]
    assert all(int(m.sum()) == len(pool_x) // 2 for m in masks)
    assert len({tuple(m.tolist()) for m in masks}) == 4  # every model its own half


def test_an_audit_writes_outputs_never_examples_and_resumes_from_its_cache(tmp_path, monkeypatch):
    config = parse_membership_config(TINY)
    audit = run_membership_audit(config, tmp_path, in_process=True, progress=False)
    names = sorted(
        p.relative_to(tmp_path).as_posix().split("/", 2)[-1]
        for p in tmp_path.rglob("*")
        if p.is_file()
    )
    assert (
        names
        == ["logits.pt"] * 4
        + ["membership.csv", "membership.json", "membership_roc.png", "report.html"]
        + ["result.json"] * 4
    )
    report = (tmp_path / "report.html").read_text()  # the table and the ROC, self-contained
    for name, row in audit["attacks"].items():
        assert f"<td>{name}</td><td>{row['auc']:.3g}</td>" in report
    assert report.count("data:image/png;base64,") == 1 and "http" not in report
    assert set(audit["attacks"]) == {"loss", "modified_entropy", "lira_offline", "rmia"}
    assert audit["members"] + audit["nonmembers"] == audit["audited"] <= 1700
    stored = json.loads((tmp_path / "membership.json").read_text())
    assert stored["attacks"]["loss"]["auc"] == audit["attacks"]["loss"]["auc"]
    # a rerun trains nothing; a DP-SGD target reuses the three reference models
    trained = []
    original = audit_module.safe_train_model
    monkeypatch.setattr(
        audit_module,
        "safe_train_model",
        lambda task, out: trained.append(task["role"]) or original(task, out),
    )
    again = run_membership_audit(config, tmp_path, in_process=True, progress=False)
    assert trained == [] and again == audit
    dp = parse_membership_config(TINY + "target: {defense: dpsgd, noise_multiplier: 1.0}\n")
    private = run_membership_audit(dp, tmp_path, in_process=True, progress=False)
    assert trained == ["target"]
    assert private["target"]["epsilon"] > 0 and private["delta"] == private["target"]["delta"]


def test_the_attacker_uses_for_each_example_only_the_reference_models_left_out_of_it(tmp_path):
    config = parse_membership_config(TINY)
    results = audit_module.run_models(config, tmp_path, in_process=True, progress=False)
    query, members, audited = audit_module._audit_query(config, tmp_path)
    n = 1700
    out = torch.stack([~inclusion_mask(n, 0, k) for k in (1, 2, 3)])
    assert torch.equal(audited, out.any(0))
    assert torch.equal(query.out_mask, out[:, audited])
    assert torch.equal(members, inclusion_mask(n, 0, 0)[audited])
    assert query.reference_logits.shape == (3, int(audited.sum()), 10)
    assert query.population_reference_logits.shape == (3, 97, 10)
    audit = audit_target(config, tmp_path, results)
    assert audit["reference_models"] == 3 and audit["audited"] == int(audited.sum())


def test_a_canary_target_reports_its_one_run_audit(tmp_path):
    config = parse_membership_config(
        TINY.replace("reference_models: 3", "reference_models: 0").replace(
            "attacks: [loss, modified_entropy, lira_offline, rmia]", "attacks: [loss]"
        )
        + "target: {canaries: {num_canaries: 40, kind: input}}\n"
    )
    audit = run_membership_audit(config, tmp_path, in_process=True, progress=False)
    canary = audit["target"]["canary_audit"]
    assert canary["canaries"] == 40 and canary["epsilon_lower_bound"] >= 0.0


@pytest.mark.slow
def test_the_models_train_in_the_sweeps_spawned_workers(tmp_path):
    config = parse_membership_config(
        TINY.replace("reference_models: 3", "reference_models: 1").replace(
            "attacks: [loss, modified_entropy, lira_offline, rmia]", "attacks: [loss]"
        )
        + "workers: 2\n"
    )
    audit = run_membership_audit(config, tmp_path, progress=False)
    assert audit["reference_models"] == 1
    assert len(list((tmp_path / "models").glob("*/logits.pt"))) == 2
