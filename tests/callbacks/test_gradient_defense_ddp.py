"""GradientDefense under 2-process DDP on CPU (gloo).

One launch of ``ddp_gradient_defense_script.py`` runs every scenario (importing Lightning twice
dominates the cost); each test checks one scenario of its JSON report. The script trains with
SGD lr=1, so ``-update`` is the defended averaged gradient, and compares it with every rank's
clean gradient averaged by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ddp_launch import run_ddp_script

pytestmark = pytest.mark.ddp

SCRIPT = Path(__file__).with_name("ddp_gradient_defense_script.py")
SCENARIOS = [
    "local",
    "aggregate",
    "layers",
    "accumulate",
    "global_clip",
    "global_topk",
    "fp16_noise",
    "fp16_clip",
    "bf16",
    "manual",
    "budget",
]
STD = 0.1
WORLD = 2


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "report.json"
    return run_ddp_script(SCRIPT, out, *SCENARIOS)


def weight_noise_ratio(step, expected_var):
    """Variance of the noise in the weight matrices over the expected variance."""
    return np.mean([step["noise_var"][n] for n in ("net.0.weight", "net.2.weight")]) / expected_var


def test_local_noise_is_added_before_the_allreduce(report):
    local = report["local"]
    assert local["placement"] == "local"  # the "auto" choice under DDP
    assert local["replicas_identical"]
    assert len(local["steps"]) == 3
    for step in local["steps"]:
        # independent per-rank noise, averaged: std^2 / world_size (full std^2 if after it)
        assert 0.85 < weight_noise_ratio(step, STD**2 / WORLD) < 1.15
    assert local["hook_calls"] == [0, 0, 0]  # the hook runs once per step (one bucket here)


def test_aggregate_noise_is_identical_on_all_ranks(report):
    agg = report["aggregate"]
    assert agg["placement"] == "aggregate"
    assert agg["replicas_identical"]
    for step in agg["steps"]:
        assert 0.85 < weight_noise_ratio(step, STD**2) < 1.15
    local_var = report["local"]["steps"][0]["noise_var"]["net.0.weight"]
    agg_var = agg["steps"][0]["noise_var"]["net.0.weight"]
    assert 1.6 < agg_var / local_var < 2.4


def test_layers_leaves_other_parameters_untouched(report):
    step = report["layers"]["steps"][0]
    assert report["layers"]["replicas_identical"]
    assert step["noise_absmax"]["net.0.weight"] < 1e-6
    assert step["noise_absmax"]["net.0.bias"] < 1e-6
    assert 0.7 < step["noise_var"]["net.2.weight"] / (STD**2 / WORLD) < 1.3


def test_accumulation_hook_runs_once_per_optimizer_step(report):
    acc = report["accumulate"]
    assert acc["replicas_identical"]
    assert acc["hook_calls"] == [0, 0]  # 4 micro-batches, 2 optimizer steps
    updates = [s["update_norm"] for s in acc["steps"]]
    assert updates[0] == 0.0 and updates[2] == 0.0  # no_sync micro-batches: no update
    assert updates[1] > 0 and updates[3] > 0


@pytest.mark.parametrize("name", ["global_clip", "global_topk"])
def test_global_view_sees_the_whole_local_gradient(report, name):
    res = report[name]
    assert res["replicas_identical"]
    # after DDP rebuilds its buckets there is one bucket per parameter
    assert max(res["hook_calls"]) == 3
    for step in res["steps"]:
        # update == mean over ranks of (transform applied to the rank's *whole* gradient)
        assert step["max_err_expected"] < 1e-6
    if name == "global_clip":
        for step in res["steps"]:
            assert step["clean_norm"] > 0.5
            assert step["update_norm"] <= 0.05 + 1e-6


def test_fp16_grad_scaler_noise_and_clipping_in_true_units(report):
    # The hook sees gradients scaled by 1024; noise and clip thresholds must not be.
    assert 0.85 < weight_noise_ratio(report["fp16_noise"]["steps"][0], STD**2 / WORLD) < 1.15
    clip = report["fp16_clip"]["steps"][0]
    assert 0.5 * 0.05 < clip["update_norm"] <= 0.05 + 1e-4
    assert report["fp16_noise"]["replicas_identical"]
    assert report["fp16_clip"]["replicas_identical"]


def test_bf16(report):
    assert report["bf16"]["replicas_identical"]
    assert 0.8 < weight_noise_ratio(report["bf16"]["steps"][0], STD**2 / WORLD) < 1.2


def test_manual_optimization_local(report):
    res = report["manual"]
    assert res["placement"] == "local" and res["replicas_identical"]
    assert res["hook_calls"] == [0, 0]
    for step in res["steps"]:
        assert 0.85 < weight_noise_ratio(step, STD**2 / WORLD) < 1.15


def test_max_epsilon_stops_every_rank_after_the_same_epoch(report):
    from lightning_privacy.accountants import BatchClippingAccountant

    res = report["budget"]
    assert res["epochs"] == [2, 2]  # stopped after 2 epochs on both ranks
    assert res["replicas_identical"]
    acct = BatchClippingAccountant(max_grad_norm=1.0, std=4.0)
    acct.step(epochs=2)
    assert res["epsilon"] == pytest.approx(acct.get_epsilon(1e-3), rel=1e-6)
