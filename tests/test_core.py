import math

import pytest
import torch

from lightning_privacy._registry import Registry
from lightning_privacy._validation import (
    check_choice,
    check_float,
    check_int,
    check_optional_schedule,
)
from lightning_privacy.functional import parameter_gradients, select_parameters


def test_check_float_messages():
    with pytest.raises(
        ValueError, match=r"Expected `std` to be a finite float >= 0.0, but got -1 \(int\)"
    ):
        check_float("std", -1, low=0.0)
    with pytest.raises(ValueError, match="nan"):
        check_float("std", math.nan, low=0.0)
    with pytest.raises(TypeError, match="str"):
        check_float("std", "1", low=0.0)
    with pytest.raises(ValueError, match="< 1"):
        check_float("ratio", 1.0, low=0.0, high=1.0, high_open=True)
    assert check_float("ratio", 0.0, low=0.0, high=1.0, high_open=True) == 0.0


def test_check_int_and_choice():
    with pytest.raises(ValueError, match=">= 1"):
        check_int("rank", 0, low=1)
    with pytest.raises(TypeError):
        check_int("rank", 1.5, low=1)
    with pytest.raises(ValueError, match="'local'"):
        check_choice("placement", "x", ("local",))


def test_schedule_rules():
    assert check_optional_schedule(None, None) == (1, None)
    with pytest.raises(ValueError, match="at most one"):
        check_optional_schedule(1, 1)
    with pytest.raises(ValueError):
        check_optional_schedule(0, None)


def test_registry_suggests():
    reg = Registry("defense")
    reg.register("gaussian_noise")(dict)
    with pytest.raises(ValueError, match="Did you mean 'gaussian_noise'"):
        reg.create("gausian_noise")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("gaussian_noise")(dict)


def test_parameter_gradients_match_backward_and_leave_model_untouched():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)
    )
    model.train()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    stats = model[1].running_mean.clone()
    grads = parameter_gradients(model, x, y, loss_fn=torch.nn.functional.cross_entropy)
    assert torch.equal(model[1].running_mean, stats)
    assert all(p.grad is None for p in model.parameters())
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)


def test_select_parameters_errors_on_unmatched_pattern():
    model = torch.nn.Linear(2, 2)
    assert list(select_parameters(model, ["weight"])) == ["weight"]
    with pytest.raises(ValueError, match="matched none"):
        select_parameters(model, "conv")
