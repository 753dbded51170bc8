import pytest
import torch

from lightning_privacy.attacks import IDLG, DeepLeakage, create_attack, list_attacks
from lightning_privacy.functional.attacks import (
    deep_leakage,
    observed_gradients_of,
    resolve_gradients,
    restore_labels,
)
from lightning_privacy.models import LeNetDLG


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _tiny_lenet(num_classes=10, seed=1234):
    torch.manual_seed(seed)
    return LeNetDLG(num_classes=num_classes, channels=1, image_size=8, width=4)


def _attack_one_image(model, grads, **options):
    """``deep_leakage`` on one 1x8x8 image (the tiny LeNet's input)."""
    return deep_leakage(model, grads, input_shape=(1, 8, 8), num_samples=1, **options)


def test_dlg_recovers_image_and_label_on_tiny_sigmoid_lenet():
    model = _tiny_lenet()
    x = torch.rand(1, 1, 8, 8, generator=_gen(5))
    y = torch.tensor([7])
    grads = observed_gradients_of(model, x, y)
    rec = DeepLeakage(max_iterations=100).reconstruct(
        model, grads, input_shape=(1, 8, 8), num_samples=1, generator=_gen(0)
    )
    mse = float(((rec.inputs - x) ** 2).mean())
    assert 10 * torch.log10(torch.tensor(1.0 / mse)) > 30
    assert rec.labels.tolist() == [7]
    assert rec.history[-1] < 1e-3 * rec.history[0]
    assert rec.metadata["labels_known"] is False and rec.metadata["bn_mode"] == "none"
    assert model.fc.weight.grad is None


def test_dlg_wrong_gradient_does_not_converge():
    """The matching loss is the success signal: a random target cannot be matched."""
    model = _tiny_lenet()
    grads = [torch.randn(p.shape, generator=_gen(3)) for p in model.parameters()]
    rec = _attack_one_image(model, grads, max_iterations=5, restarts=2, generator=_gen(0))
    assert len(rec.metadata["trial_losses"]) == 2
    assert rec.objective > 1e-3


def test_restarts_keep_the_smallest_loss_and_stop_on_success():
    model = _tiny_lenet()
    x = torch.rand(1, 1, 8, 8, generator=_gen(2))
    grads = observed_gradients_of(model, x, torch.tensor([1]))
    rec = _attack_one_image(
        model,
        grads,
        labels=torch.tensor([1]),
        max_iterations=2,
        restarts=3,
        tol=0.0,
        generator=_gen(0),
    )
    losses = rec.metadata["trial_losses"]
    assert len(losses) == 3 and rec.objective == pytest.approx(min(losses))
    assert rec.metadata["labels_known"] is True


def test_same_generator_same_result_and_global_rng_untouched():
    model = _tiny_lenet()
    grads = observed_gradients_of(model, torch.rand(1, 1, 8, 8), torch.tensor([2]))
    state = torch.get_rng_state()
    a, b = (
        _attack_one_image(model, grads, max_iterations=3, restarts=1, generator=_gen(4))
        for _ in range(2)
    )
    assert torch.equal(a.inputs, b.inputs)
    assert torch.equal(state, torch.get_rng_state())


def test_idlg_label_rule_single_and_batch():
    model = _tiny_lenet(num_classes=10)
    for label in range(10):
        grads = observed_gradients_of(
            model, torch.rand(1, 1, 8, 8, generator=_gen(label)), torch.tensor([label])
        )
        assert restore_labels(model, grads, 1).tolist() == [label]
    head = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    y = torch.tensor([1, 4, 8])
    grads = observed_gradients_of(head, torch.rand(3, 6, generator=_gen(1)), y)
    assert restore_labels(head, grads, 3).tolist() == [1, 4, 8]


def test_idlg_component_uses_extracted_label():
    model = _tiny_lenet()
    grads = observed_gradients_of(model, torch.rand(1, 1, 8, 8), torch.tensor([6]))
    rec = IDLG(max_iterations=2, restarts=1).reconstruct(
        model, grads, input_shape=(1, 8, 8), num_samples=1, generator=_gen(0)
    )
    assert rec.labels.tolist() == [6] and rec.metadata["label_strategy"] == "idlg"


def test_registry_and_config_validation():
    assert {"deep_leakage", "idlg"} <= set(list_attacks())
    assert isinstance(create_attack("deep_leakage"), DeepLeakage)
    with pytest.raises(ValueError, match="Did you mean 'idlg'"):
        create_attack("idgl")
    with pytest.raises(ValueError, match="restarts"):
        DeepLeakage(restarts=0)
    with pytest.raises(ValueError, match="init"):
        DeepLeakage(init="zeros")
    with pytest.raises(ValueError, match="box"):
        DeepLeakage(box=(1.0, 0.0))
    original = DeepLeakage.original()
    assert (original.init, original.line_search, original.restarts) == ("randn", False, 1)


def test_gradient_shape_mismatch_is_a_clear_error():
    model = _tiny_lenet()
    with pytest.raises(ValueError, match="one gradient per trainable parameter"):
        resolve_gradients(model, [torch.zeros(1)])
    with pytest.raises(ValueError, match="shape"):
        resolve_gradients(model, {"fc.bias": torch.zeros(3)})


def test_batch_label_counts_with_repeats():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    for y in ([2, 2, 5], [0, 3, 3, 3, 9], [1, 4, 8]):
        labels = torch.tensor(y)
        grads = observed_gradients_of(head, torch.rand(len(y), 6, generator=_gen(len(y))), labels)
        assert restore_labels(head, grads, len(y)).tolist() == sorted(y)


def test_start_is_used_and_checked():
    """A start at the true inputs is already a solution: the attack stays there; the random
    start from the same generator ends elsewhere after one step."""
    model = _tiny_lenet()
    x = torch.rand(1, 1, 8, 8, generator=_gen(4))
    y = torch.tensor([2])
    grads = observed_gradients_of(model, x, y)
    common = dict(input_shape=(1, 8, 8), num_samples=1, labels=y, max_iterations=1, restarts=1)
    warm = deep_leakage(model, grads, start=x, generator=_gen(0), **common)
    cold = deep_leakage(model, grads, generator=_gen(0), **common)
    assert float((warm.inputs - x).abs().max()) < 1e-5
    assert float((cold.inputs - x).abs().max()) > 1e-2
    with pytest.raises(ValueError, match=r"`start` of shape .*\[1, 1, 8, 8\].*\[1, 8, 8\]"):
        deep_leakage(model, grads, start=x[0], **common)
    with pytest.raises(ValueError, match="`start` to be finite"):
        deep_leakage(model, grads, start=torch.full_like(x, float("nan")), **common)
