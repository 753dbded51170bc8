"""InvertingGradients.fast(): the learning-rate stages, the plateau stop, the step callback."""

import itertools
import math

import pytest
import torch

from lightning_privacy.attacks import InvertingGradients, create_attack
from lightning_privacy.functional.attacks import inverting_gradients, observed_gradients_of
from lightning_privacy.functional.attacks.inverting import PLATEAU_TOLERANCE, _Stages


def _victim():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.Sigmoid(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 36, 5),
    )
    x = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    return net, x, observed_gradients_of(net, x, torch.tensor([3]))


def _milestones(n):
    return [round(n * f) for f in (3 / 8, 5 / 8, 7 / 8)]


@pytest.mark.parametrize("iterations", [1, 2, 3, 7, 50, 2000])
def test_stages_without_patience_are_multistep_lr_bit_for_bit(iterations):
    milestones = _milestones(iterations)
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=0.1)
    reference = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    stages, lr = _Stages(milestones, None), 0.1
    for step in range(iterations):
        decays = stages.decays(step, 1.0)
        assert decays is not None
        if decays:
            lr = lr * 0.1**decays
        assert lr == optimizer.param_groups[0]["lr"], step  # exactly the same float
        optimizer.step()
        reference.step()


def test_a_plateau_moves_to_the_next_stage_and_the_last_stage_plateau_stops():
    stages = _Stages([1000, 2000, 3000], patience=5)
    decays_at = {}
    for step in range(100):
        decays = stages.decays(step, 1.0)  # the best objective never improves
        if decays is None:
            stop = step
            break
        if decays:
            decays_at[step] = decays
    assert decays_at == {10: 1, 15: 1, 20: 1}  # the first window sets the mark at step 5
    assert stop == 25


def test_steady_improvement_is_no_plateau():
    stages = _Stages([30, 50, 70], patience=5)
    best, decays_at = 1.0, []
    for step in range(80):
        best *= 1 - 2 * PLATEAU_TOLERANCE  # 0.2 % per step: 1 % per window, above the tolerance
        decays = stages.decays(step, best)
        assert decays is not None
        if decays:
            decays_at.append(step)
    assert decays_at == [30, 50, 70]  # only the scheduled milestones


def test_fast_preset_stops_on_a_plateau_and_keeps_the_best_iterate():
    net, _, grads = _victim()
    common = dict(input_shape=(1, 6, 6), num_samples=1, tv_weight=0.0)
    seen = []
    rec = inverting_gradients(
        net,
        grads,
        max_iterations=5_000,
        patience=20,
        generator=torch.Generator().manual_seed(0),
        callback=lambda step, objective, inputs: seen.append((step, objective, inputs)),
        **common,
    )
    assert rec.metadata["iterations"] < 5_000  # the plateau ended it
    assert [s for s, _, _ in seen] == list(range(len(seen)))
    objectives = [o for _, o, _ in seen]
    assert all(b <= a for a, b in itertools.pairwise(objectives))
    assert torch.equal(seen[-1][2], rec.inputs) and seen[-1][1] == min(rec.history)
    assert min(rec.history) < 0.05 * rec.history[0]


def test_fast_and_original_presets():
    fast = InvertingGradients.fast()
    assert (fast.max_iterations, fast.patience, fast.method) == (1000, 50, "double_backward")
    assert (fast.lr, fast.tv_weight, fast.signed, fast.decay) == (0.1, 0.2, True, True)
    assert InvertingGradients.fast(patience=None, max_seconds=5).max_seconds == 5
    assert (
        InvertingGradients.original()
        == InvertingGradients()
        == create_attack("inverting_gradients")
    )
    assert InvertingGradients.original().patience is None
    with pytest.raises(ValueError, match="patience"):
        InvertingGradients(patience=0)


def test_fast_preset_honours_max_seconds():
    net, _, grads = _victim()
    rec = InvertingGradients.fast(max_iterations=10**6, patience=None, max_seconds=0.3).reconstruct(
        net, grads, input_shape=(1, 6, 6), num_samples=1
    )
    assert rec.metadata["iterations"] < 10**6 and rec.metadata["seconds"] < 5.0
    assert math.isfinite(rec.objective)
