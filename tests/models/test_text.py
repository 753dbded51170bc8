import pytest
import torch

from lightning_privacy.models import TinyTransformerLM, language_model_loss


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_transformer_lm_shapes_causality_and_tying(tied):
    torch.manual_seed(0)
    lm = TinyTransformerLM(
        vocab_size=30, d_model=16, n_layers=2, n_heads=4, max_len=10, tie_embeddings=tied
    )
    tokens = torch.randint(0, 30, (2, 10))
    logits = lm(tokens)
    assert logits.shape == (2, 10, 30)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 30
    assert torch.allclose(lm(changed)[:, :-1], logits[:, :-1], atol=1e-6)  # causal
    assert (lm.lm_head.weight is lm.token_embedding.weight) is tied
    names = [n for n, _ in lm.named_parameters()]
    assert ("lm_head.weight" in names) is (not tied)
    loss = language_model_loss(logits, tokens)
    assert torch.isfinite(loss) and loss > 0


def test_tiny_transformer_lm_rejects_bad_config_and_input():
    with pytest.raises(ValueError, match="n_heads"):
        TinyTransformerLM(d_model=10, n_heads=3)
    lm = TinyTransformerLM(vocab_size=10, d_model=8, n_layers=1, n_heads=2, max_len=4)
    with pytest.raises(ValueError, match="at most 4"):
        lm(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        lm(torch.zeros(1, 3))
