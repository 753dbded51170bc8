"""Attacks on batches: the label rules, worst-image PSNR, an audit of 8 examples."""

import copy

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


def _bn_victim(size=8):
    """A train-mode BN convnet, a digit batch, its gradient, and the attacker's copy holding the
    batch's BatchNorm statistics in its buffers (``bn_stats_known``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(512, 10),
    ).train()
    x, y = digits(size)
    grads = observed_gradients_of(model, x, y)
    attacker = copy.deepcopy(model)
    norms = [m for m in attacker.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o: stats.__setitem__(m, i[0].detach())) for m in norms
    ]
    with torch.no_grad():
        attacker(x)  # train mode: the batch's statistics; the buffers are overwritten below
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for m in norms:
            m.running_mean.copy_(stats[m].mean([0, 2, 3]))
            m.running_var.copy_(stats[m].var([0, 2, 3], unbiased=False))
    return attacker, x, y, grads


def test_bn_prior_with_known_batch_statistics_reconstructs_a_train_mode_batch():
    attacker, x, y, grads = _bn_victim()
    buffers = {k: v.clone() for k, v in attacker.state_dict().items()}
    scores = {}
    for weight in (0.0, 0.1):
        rec = InvertingGradients.fast(max_iterations=150, bn_weight=weight, tv_weight=0.05)
        rec = rec.reconstruct(
            attacker,
            grads,
            input_shape=(1, 8, 8),
            num_samples=8,
            generator=torch.Generator().manual_seed(0),
        )
        scores[weight] = reconstruction_metrics(rec, (x, y))
        assert rec.metadata["bn_mode"] == "train" and rec.metadata["method"] == "double_backward"
        assert rec.metadata["bn_stats_known"] is (weight > 0)
    assert scores[0.1]["psnr_worst"] > scores[0.0]["psnr"] + 5  # every image, by a wide margin
    for key, value in attacker.state_dict().items():  # the model is read, never written
        assert torch.equal(value, buffers[key]), key
    assert all(not m._forward_hooks for m in attacker.modules())


def test_bn_prior_needs_the_double_backward_path():
    attacker, _, _, grads = _bn_victim(2)
    with pytest.raises(ValueError, match="forward_mode"):
        InvertingGradients(max_iterations=1, bn_weight=0.1, method="forward_mode").reconstruct(
            attacker, grads, input_shape=(1, 8, 8), num_samples=2
        )
    with pytest.raises(ValueError, match="bn_weight"):
        InvertingGradients(bn_weight=-1.0)
