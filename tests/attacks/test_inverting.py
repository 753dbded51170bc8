import pytest
import torch

from lightning_privacy.attacks import InvertingGradients, create_attack
from lightning_privacy.functional.attacks import observed_gradients_of
from lightning_privacy.functional.attacks.common import GradientMatcher
from lightning_privacy.functional.attacks.inverting import _cosine_and_input_grad
from lightning_privacy.functional.gradients import gradient_product_input_grad


def _net(bn=True):
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(1, 4, 3, padding=1)]
    if bn:
        layers.append(torch.nn.BatchNorm2d(4))
    layers += [torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 5)]
    return torch.nn.Sequential(*layers)


def test_forward_mode_equals_double_backward():
    model = _net().eval()
    x = torch.rand(1, 1, 6, 6)
    y = torch.tensor([3])
    matcher = GradientMatcher(
        model, observed_gradients_of(model, x, y), loss_fn=torch.nn.functional.cross_entropy
    )
    probe = torch.rand(1, 1, 6, 6)
    v1, g1 = _cosine_and_input_grad(matcher, probe, y, "forward_mode")
    v2, g2 = _cosine_and_input_grad(matcher, probe, y, "double_backward")
    assert v1 == pytest.approx(v2, abs=1e-5)
    assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-3)


def test_gradient_product_input_grad_subset_of_parameters():
    model = _net(bn=False)
    x, y = torch.rand(2, 1, 6, 6), torch.tensor([0, 1])
    v = {"3.weight": torch.randn(5, 144)}
    fast = gradient_product_input_grad(model, x, y, v, loss_fn=torch.nn.functional.cross_entropy)
    xr = x.clone().requires_grad_()
    out = model(xr)
    (gw,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(out, y), model[3].weight, create_graph=True
    )
    (slow,) = torch.autograd.grad((gw * v["3.weight"]).sum(), xr)
    assert torch.allclose(fast, slow, atol=1e-6)
    assert model[3].weight.grad is None


def test_inverting_gradients_improves_and_respects_box_and_bn_state():
    model = _net().eval()
    running = model[1].running_mean.clone()
    x = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    grads = observed_gradients_of(model, x, torch.tensor([2]))
    rec = InvertingGradients(max_iterations=60, tv_weight=0.0).reconstruct(
        model,
        grads,
        input_shape=(1, 6, 6),
        num_samples=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert rec.labels.tolist() == [2]
    assert min(rec.history) < 0.5 * rec.history[0]
    assert rec.inputs.min() >= 0 and rec.inputs.max() <= 1
    assert rec.metadata["bn_mode"] == "eval" and rec.metadata["bn_stats_known"] is True
    assert torch.equal(running, model[1].running_mean)


def test_train_mode_bn_uses_double_backward_and_leaves_stats():
    model = _net().train()
    running = model[1].running_mean.clone()
    grads = observed_gradients_of(model, torch.rand(2, 1, 6, 6), torch.tensor([0, 4]))
    rec = create_attack("inverting_gradients", max_iterations=3).reconstruct(
        model, grads, input_shape=(1, 6, 6), num_samples=2
    )
    assert rec.metadata["method"] == "double_backward" and rec.metadata["bn_mode"] == "train"
    assert sorted(rec.labels.tolist()) == [0, 4]
    assert torch.equal(running, model[1].running_mean)


def test_max_seconds_bounds_the_run_and_config_validation():
    model = _net(bn=False)
    grads = observed_gradients_of(model, torch.rand(1, 1, 6, 6), torch.tensor([1]))
    rec = InvertingGradients(max_iterations=100_000, max_seconds=0.2).reconstruct(
        model, grads, input_shape=(1, 6, 6), num_samples=1
    )
    assert rec.metadata["iterations"] < 100_000
    with pytest.raises(ValueError, match="max_seconds"):
        InvertingGradients(max_seconds=0)
    with pytest.raises(ValueError, match="method"):
        InvertingGradients(method="fast")


def test_a_timm_vision_transformer_is_attacked_as_it_is():
    """Its fused attention kernel has no double backward: ``reconstruct`` switches to the math
    kernel itself, so a user calling an attack directly needs no context manager."""
    import timm

    from lightning_privacy.attacks import create_attack
    from lightning_privacy.functional.gradients import parameter_gradients

    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(
        img_size=8, patch_size=4, num_classes=3, embed_dim=16, depth=1, num_heads=2
    ).eval()
    x, y = torch.rand(1, 3, 8, 8), torch.tensor([1])
    observed = parameter_gradients(vit, x, y, loss_fn=torch.nn.functional.cross_entropy)
    attack = create_attack("inverting_gradients", max_iterations=3)
    rec = attack.reconstruct(vit, observed, input_shape=(3, 8, 8), num_samples=1, labels=y)
    assert rec.inputs.shape == (1, 3, 8, 8) and torch.isfinite(rec.inputs).all()
    assert len(rec.history) == 3
