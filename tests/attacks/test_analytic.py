import pytest
import torch

from lightning_privacy.attacks import AnalyticLinear, TokenLeakage, create_attack
from lightning_privacy.functional import parameter_gradients
from lightning_privacy.functional.attacks import analytic_linear, observed_gradients_of
from lightning_privacy.models import LeNetDLG, TinyTransformerLM


def _mlp(width=256, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(48, width), torch.nn.ReLU(), torch.nn.Linear(width, 10)
    )


def test_single_sample_is_exact():
    model = _mlp()
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    rec = AnalyticLinear().reconstruct(
        model,
        observed_gradients_of(model, x, torch.tensor([4])),
        input_shape=(3, 4, 4),
        num_samples=1,
    )
    mse = float(((rec.inputs - x) ** 2).mean())
    assert 10 * torch.log10(torch.tensor(1.0 / mse)) > 60
    assert rec.labels.tolist() == [4] and rec.metadata["rows_used"] > 0


def test_batch_rows_reached_by_one_sample_are_grouped():
    model = _mlp(width=512, seed=3)
    with torch.no_grad():  # sparse first layer: most rows see one sample only
        model[1].bias.fill_(-0.3)
    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 5, 7])
    rec = analytic_linear(
        model, observed_gradients_of(model, x, y), input_shape=(3, 4, 4), num_samples=3
    )
    errors = torch.cdist(rec.inputs.flatten(1), x.flatten(1))
    best = errors.min(dim=0).values
    assert float(best.max()) < 1e-3
    assert sorted(rec.labels.tolist()) == [1, 5, 7]


def test_analytic_needs_a_linear_first_layer():
    with pytest.raises(ValueError, match=r"nn\.Linear with a bias"):
        create_attack("analytic_linear").reconstruct(
            LeNetDLG(num_classes=4, channels=1, image_size=8),
            [
                torch.zeros(p.shape)
                for p in LeNetDLG(num_classes=4, channels=1, image_size=8).parameters()
            ],
            input_shape=(1, 8, 8),
            num_samples=1,
        )
    model = _mlp()
    with pytest.raises(ValueError, match="elements"):
        analytic_linear(
            model,
            [torch.zeros(p.shape) for p in model.parameters()],
            input_shape=(5,),
            num_samples=1,
        )


@pytest.mark.parametrize("tied", [True, False])
def test_token_leakage_recovers_the_token_set(tied):
    for seed in range(2):
        torch.manual_seed(seed)
        lm = TinyTransformerLM(
            vocab_size=150, d_model=32, n_layers=1, n_heads=2, max_len=12, tie_embeddings=tied
        )
        tokens = torch.randint(0, 150, (3, 12))
        grads = parameter_gradients(lm, tokens, tokens, loss_fn=lm.loss_fn)
        rec = TokenLeakage().reconstruct(lm, grads, input_shape=(12,), num_samples=3)
        assert rec.inputs.tolist() == sorted(set(tokens.flatten().tolist()))
        assert rec.metadata["tied"] is tied


def test_token_leakage_on_an_image_model_is_a_clear_error():
    model = _mlp()
    with pytest.raises(ValueError, match=r"nn\.Embedding"):
        TokenLeakage().reconstruct(
            model,
            [torch.zeros(p.shape) for p in model.parameters()],
            input_shape=(4,),
            num_samples=1,
        )
    assert TokenLeakage.modality == "text" and AnalyticLinear.modality == "image"
