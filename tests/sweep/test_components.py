"""A sweep reads what a component accepts from the component: new defenses need no sweep edit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest

from lightning_privacy.callbacks import DPSGD, GradientDefense, LeakageMonitor, MembershipAudit
from lightning_privacy.defenses import DEFENSES, GradientTransform
from lightning_privacy.sweep import STRENGTH_PARAMETERS, SweepConfigError, parse_sweep_config
from lightning_privacy.sweep.components import defense_options, integer_strength
from lightning_privacy.sweep.runner import run_sweep
from lightning_privacy.sweep.trial import build_callbacks


@dataclass(frozen=True, kw_only=True)
class _Quantize(GradientTransform):
    """A defense registered only by this test: round each entry to ``levels`` steps of ``step``."""

    levels: int
    step: float = 0.01
    strength: ClassVar[str] = "levels"
    uses_randomness: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.step <= 0:
            raise ValueError(f"Expected `step` to be a finite float > 0.0, but got {self.step!r}.")

    def __call__(self, gradients, *, generator=None):
        steps = [(g / self.step).round().clamp(-self.levels, self.levels) for g in gradients]
        return [s * self.step for s in steps]


@pytest.fixture
def quantize() -> Iterator[str]:
    name = "test_quantize"
    DEFENSES.register(name)(_Quantize)
    try:
        yield name
    finally:
        DEFENSES._entries.pop(name, None)


def test_a_newly_registered_defense_is_validated_and_built(quantize):
    text = f"""\
defenses:
  - name: {quantize}
    strengths: [2, 8.0]
    step: 0.05
data: {{image_size: 16, batch_size: 16}}
training: {{epochs: 1, limit_train_batches: 2}}
audit: null
leakage: null
membership: null
"""
    assert STRENGTH_PARAMETERS[quantize] == "levels" and integer_strength(quantize)
    assert defense_options(quantize) == ("step",)
    trials = parse_sweep_config(text).trials()
    assert [t.label for t in trials] == [f"{quantize}=2", f"{quantize}=8"]
    (defense,) = build_callbacks(trials[1])
    assert isinstance(defense, GradientDefense)
    assert defense.transforms == (_Quantize(levels=8, step=0.05),)
    assert type(defense.transforms[0].levels) is int  # 8.0 in the file: an int field


@pytest.mark.parametrize(
    ("entry", "key", "line", "fragment"),
    [
        ("strengths: [2.5]", "defenses[0].strengths[0]", 3, "Expected `strength` to be an int"),
        ("strengths: [2]\n    step: -1.0", "defenses[0].step", 4, "Expected `step`"),
        ("strengths: [2]\n    stp: 0.1", "defenses[0].stp", 4, "Did you mean 'step'?"),
        ("strengths: [2]\n    levels: 3", "defenses[0].levels", 4, "Unknown key 'levels'"),
    ],
    ids=["fractional-levels", "bad-option", "typo", "strength-as-option"],
)
def test_a_newly_registered_defense_reports_errors_at_their_line(
    quantize, entry, key, line, fragment
):
    with pytest.raises(SweepConfigError) as info:
        parse_sweep_config(f"defenses:\n  - name: {quantize}\n    {entry}\n")
    assert info.value.key == key and info.value.line == line
    assert fragment in str(info.value)


def test_a_newly_registered_defense_trains_in_a_sweep(quantize, tmp_path):
    config = parse_sweep_config(
        f"""\
defenses: [{{name: {quantize}, strengths: [4]}}]
data: {{image_size: 16, batch_size: 16}}
training: {{epochs: 1, limit_train_batches: 2}}
audit: null
leakage: null
"""
    )
    (result,) = run_sweep(config, tmp_path, in_process=True, progress=False)
    assert result["status"] == "ok" and result["defense"] == quantize
    assert "GradientDefense" in result["threat_model"]["callbacks"]


def test_a_defense_without_a_strength_is_refused(quantize):
    @dataclass(frozen=True, kw_only=True)
    class NoStrength(GradientTransform):
        def __call__(self, gradients, *, generator=None):
            return list(gradients)

    DEFENSES.register("test_no_strength")(NoStrength)
    try:
        with pytest.raises(SweepConfigError, match="declares no `strength`") as info:
            parse_sweep_config("defenses:\n  - {name: test_no_strength, strengths: [1]}\n")
        assert info.value.key == "defenses[0].name"
    finally:
        DEFENSES._entries.pop("test_no_strength", None)


def test_strength_parameters_follow_the_registry():
    for name in DEFENSES:
        assert STRENGTH_PARAMETERS[name] == DEFENSES.get(name).strength
    assert STRENGTH_PARAMETERS["dpsgd"] == "noise_multiplier"
    assert "none" not in STRENGTH_PARAMETERS


def test_options_are_the_components_arguments():
    assert "max_grad_norm" in defense_options("dpsgd")
    assert "noise_multiplier" not in defense_options("dpsgd")
    spec = parse_sweep_config(
        "defenses: [{name: dpsgd, strengths: [2.0], max_grad_norm: 0.5, poisson_sampling: false}]\n"
        "leakage: {damping: 0.1, on_exceed: stop, max_predicted_psnr: 40}\n"
        "audit: null\n"
        "membership: {attack: confidence, num_samples: 50, per_class: true}\n"
    ).trials()[0]
    dpsgd, leakage, membership = build_callbacks(spec)
    assert isinstance(dpsgd, DPSGD) and dpsgd.max_grad_norm == 0.5
    assert isinstance(leakage, LeakageMonitor)
    assert (leakage.damping, leakage.on_exceed, leakage.num_samples) == (0.1, "stop", 1)
    assert isinstance(membership, MembershipAudit)
    assert type(membership.attack).__name__ == "ConfidenceAttack"
    assert (membership.num_samples, membership.per_class, membership.log_roc) == (50, True, False)
