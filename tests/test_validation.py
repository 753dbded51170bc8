"""Arguments are checked as what they are: a flag is a bool, never a truthy string or an int."""

from __future__ import annotations

import pytest

from lightning_privacy.attacks import DeepLeakage, InvertingGradients
from lightning_privacy.callbacks import DPSGD, GradientDefense, InversionAudit, LeakageMonitor
from lightning_privacy.data import DigitsDataModule, TorchvisionDataModule
from lightning_privacy.defenses import GaussianNoise
from lightning_privacy.models import TinyTransformerLM
from lightning_privacy.sweep import SweepConfigError, parse_sweep_config

FLAGS = {
    "DPSGD(poisson_sampling='no')": (
        lambda: DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, poisson_sampling="no"),
        "poisson_sampling",
    ),
    "DPSGD(fix_model='false')": (
        lambda: DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, fix_model="false"),
        "fix_model",
    ),
    "DPSGD(secure_mode=0)": (
        lambda: DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, secure_mode=0),
        "secure_mode",
    ),
    "GradientDefense(draw_noise_ahead='no')": (
        lambda: GradientDefense(GaussianNoise(std=0.1), draw_noise_ahead="no"),
        "draw_noise_ahead",
    ),
    "InversionAudit(log_images='no')": (lambda: InversionAudit(log_images="no"), "log_images"),
    "InversionAudit(apply_defenses=1)": (
        lambda: InversionAudit(apply_defenses=1),
        "apply_defenses",
    ),
    "LeakageMonitor(per_class='yes')": (lambda: LeakageMonitor(per_class="yes"), "per_class"),
    "DeepLeakage(line_search=1)": (lambda: DeepLeakage(line_search=1), "line_search"),
    "InvertingGradients(signed=0)": (lambda: InvertingGradients(signed=0), "signed"),
    "TinyTransformerLM(tie_embeddings=1)": (
        lambda: TinyTransformerLM(vocab_size=10, tie_embeddings=1),
        "tie_embeddings",
    ),
    "TorchvisionDataModule(download='no')": (
        lambda: TorchvisionDataModule(download="no"),
        "download",
    ),
    "DigitsDataModule(channels=True)": (lambda: DigitsDataModule(channels=True), "channels"),
}


@pytest.mark.parametrize("case", list(FLAGS))
def test_issue14_item4_string_and_integer_booleans_are_refused(case):
    """Item 4: DPSGD(poisson_sampling="no") and DPSGD(fix_model="false") were taken as True."""
    build, name = FLAGS[case]
    with pytest.raises((TypeError, ValueError), match=rf"Expected `{name}` to be .*got "):
        build()


def test_issue14_item4_a_string_boolean_in_a_sweep_file_is_refused_at_its_line():
    text = (
        "defenses:\n"
        "  - name: dpsgd\n"
        "    strengths: [1.0]\n"
        "    poisson_sampling: 'no'\n"
        "audit: {attack: deep_leakage, options: {line_search: 1}}\n"
    )
    with pytest.raises(SweepConfigError) as caught:
        parse_sweep_config(text, source="s.yaml")
    message = str(caught.value)
    assert "line 4, key `defenses[0].poisson_sampling`" in message
    assert "Expected `poisson_sampling` to be a bool, but got 'no' (str)" in message


def test_issue14_item12_errors_name_the_argument_the_allowed_ones_and_a_suggestion():
    """Item 12: Python's bare "unexpected keyword argument 'sigma'" and an unnamed `batch`."""
    import torch

    from lightning_privacy.accountants import create_accountant
    from lightning_privacy.attacks import create_attack
    from lightning_privacy.defenses import create_defense

    with pytest.raises(TypeError) as caught:
        create_defense("gaussian_noise", sigma=0.1)
    assert str(caught.value) == (
        "Unknown argument `sigma` for the defense 'gaussian_noise'. Did you mean 'std'? "
        "Allowed: 'std'."
    )
    with pytest.raises(TypeError, match=r"`max_iteration` .*Did you mean 'max_iterations'\?"):
        create_attack("deep_leakage", max_iteration=10)
    with pytest.raises(TypeError, match=r"Missing argument\(s\) `std` for the accountant"):
        create_accountant("batch_clipping", max_grad_norm=1.0)
    with pytest.raises(TypeError, match=r"`batch`.*a tuple of 1 element"):
        InversionAudit(batch=(torch.zeros(2, 1, 8, 8),))
    text = "defenses:\n  - name: gaussian_noise\n    strengths: [0.1]\n    sigma: 0.1\n"
    with pytest.raises(SweepConfigError) as caught:
        parse_sweep_config(text, source="s.yaml")
    message = str(caught.value)
    assert "line 4, key `defenses[0].sigma`: Unknown key 'sigma'" in message
    assert "Values of `std` (the defense's strength) go in `strengths:`" in message
