"""Attacks on batches: the label rules, worst-image PSNR, an audit of 8 examples."""

import lightning as L
import numpy as np
import pytest
import torch
from helpers import BoringModel, digits, digits_loader, fit
from PIL import Image
from scipy.optimize import linear_sum_assignment

from lightning_privacy.attacks import InvertingGradients
from lightning_privacy.callbacks import InversionAudit
from lightning_privacy.functional.attacks import observed_gradients_of, restore_labels
from lightning_privacy.metrics import reconstruction_metrics


def _relu_net(bias=True, scale=0.05):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(20, 30), torch.nn.ReLU(), torch.nn.Linear(30, 6, bias=bias)
    )
    with torch.no_grad():
        net[2].weight.mul_(scale)  # near-uniform softmax: the count estimate is exact
    return net


def test_count_rule_restores_repeated_labels_the_others_cannot():
    net = _relu_net()
    y = torch.tensor([1, 1, 1, 4, 4, 5, 0, 0])
    grads = observed_gradients_of(net, torch.rand(8, 20), y)
    assert restore_labels(net, grads, 8).tolist() == sorted(y.tolist())  # auto = count
    assert restore_labels(net, grads, 8, rule="count").tolist() == sorted(y.tolist())
    sign = restore_labels(net, grads, 8, rule="sign")
    # class 5 is 1/8 of the batch, below its mean softmax mass (~1/6): its bias gradient is
    # positive, so the sign rule misses it and cycles through the others instead
    assert set(sign.tolist()) == {0, 1, 4} and len(sign) == 8
    assert restore_labels(net, grads, 8, rule="yin").tolist() != sorted(y.tolist())


def test_yin_rule_is_exact_for_distinct_labels_without_a_bias():
    net = _relu_net(bias=False)
    y = torch.tensor([5, 2, 0])
    grads = observed_gradients_of(net, torch.rand(3, 20), y)
    assert restore_labels(net, grads, 3).tolist() == [0, 2, 5]  # auto = yin without a bias
    with pytest.raises(ValueError, match="bias"):
        restore_labels(net, grads, 3, rule="count")
    with pytest.raises(ValueError, match="rule"):
        restore_labels(net, grads, 3, rule="magic")


def test_psnr_worst_is_the_worst_matched_image():
    truth = torch.full((3, 1, 8, 8), 0.5)
    errors = torch.tensor([0.1, 0.01, 0.001]).view(3, 1, 1, 1)
    rec = (truth + errors).flip(0)  # the attacker's order is arbitrary
    scores = reconstruction_metrics(rec, truth)
    assert scores["psnr_worst"] == pytest.approx(20.0)
    assert scores["psnr"] == pytest.approx(40.0)
    single = reconstruction_metrics(truth[:1] + 0.1, truth[:1])
    assert single["psnr_worst"] == single["psnr"]


def test_audit_of_eight_examples_logs_batch_metrics_and_a_matched_grid(
    fast_trainer_kwargs, tmp_path
):
    x, y = digits(8)
    attack = InvertingGradients.fast(max_iterations=15, tv_weight=0.01)
    audit = InversionAudit(attack, batch=(x, y), num_samples=8, image_dir=tmp_path / "grids")
    L.seed_everything(7, workers=True)
    trainer, _ = fit(fast_trainer_kwargs, [audit], BoringModel(), digits_loader(), max_epochs=1)
    metrics = trainer.callback_metrics
    assert float(metrics["attack/psnr_worst"]) <= float(metrics["attack/psnr"])
    assert 0.0 <= float(metrics["attack/label_acc"]) <= 1.0
    assert audit.last.inputs.shape == (8, 1, 8, 8) and audit.last.labels.shape == (8,)
    (png,) = (tmp_path / "grids").glob("step_*.png")
    grid = np.asarray(Image.open(png).convert("L"), dtype=np.float64) / 255
    assert grid.shape == (2 * 9 + 1, 8 * 9 + 1)  # truth over reconstruction, all 8, 1 px padding
    cells = [[grid[1 + 9 * r : 9 * r + 9, 1 + 9 * c : 9 * c + 9] for c in range(8)] for r in (0, 1)]
    assert np.allclose(np.stack(cells[0]), x.squeeze(1).numpy(), atol=1 / 255)
    cost = np.array([[((t - b) ** 2).sum() for b in cells[1]] for t in cells[0]])
    rows, cols = linear_sum_assignment(cost)
    assert cost[rows, cols].sum() == pytest.approx(np.trace(cost), abs=1e-3)  # already matched
