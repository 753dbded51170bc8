"""A small causal transformer language model, pure PyTorch, for token-leakage experiments.

Example:
    >>> import torch
    >>> lm = TinyTransformerLM(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_len=8)
    >>> tokens = torch.randint(0, 50, (2, 8))
    >>> logits = lm(tokens)
    >>> tuple(logits.shape), float(language_model_loss(logits, tokens)) > 0
    ((2, 8, 50), True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_privacy._validation import check_choice, check_float, check_int


def language_model_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy: position ``t`` predicts token ``t + 1`` (mean over positions).

    Args:
        logits: ``(batch, seq, vocab)``.
        tokens: ``(batch, seq)`` token ids (the inputs; targets are them shifted by one).

    Example:
        >>> language_model_loss(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]])).item()
        1.3862943649291992
    """
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


class TinyTransformerLM(nn.Module):
    """Token + learned position embeddings, pre-norm causal transformer blocks, a linear head.

    Args:
        vocab_size: Number of token ids.
        d_model: Width.
        n_layers: Transformer blocks.
        n_heads: Attention heads (must divide ``d_model``).
        max_len: Longest sequence.
        tie_embeddings: Share the token embedding with the output projection (GPT-2 style).
        dropout: Dropout inside the blocks (0 by default so gradients are deterministic).

    Weights follow GPT-2's initialisation (normal, std 0.02); seed with ``torch.manual_seed``.

    Attributes:
        token_embedding: ``nn.Embedding(vocab_size, d_model)``; its gradient leaks the tokens.
        lm_head: ``nn.Linear(d_model, vocab_size, bias=False)``; its weight *is* the embedding
            weight when tied (then it is not a separate parameter).
        loss_fn: :func:`language_model_loss`, read by the attacks and callbacks.

    Example:
        >>> lm = TinyTransformerLM(vocab_size=20, d_model=8, n_layers=1, n_heads=2, max_len=4,
        ...                        tie_embeddings=False)
        >>> lm.lm_head.weight is lm.token_embedding.weight
        False
    """

    modality = "text"

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        max_len: int = 64,
        tie_embeddings: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, low=2)
        check_int("d_model", d_model, low=1)
        check_int("n_layers", n_layers, low=1)
        check_int("n_heads", n_heads, low=1)
        check_int("max_len", max_len, low=1)
        check_choice("tie_embeddings", tie_embeddings, (True, False))
        check_float("dropout", dropout, low=0.0, high=1.0, high_open=True)
        if d_model % n_heads:
            raise ValueError(
                f"Expected `n_heads` to divide `d_model` ({d_model}), but got {n_heads} (int)."
            )
        self.vocab_size, self.max_len, self.tie_embeddings = vocab_size, max_len, tie_embeddings
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            n_heads,
            dim_feedforward=4 * d_model,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.loss_fn = language_model_loss
        self._init_gpt2()

    def _init_gpt2(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) embeddings and linear weights, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(batch, seq, vocab)`` for token ids ``(batch, seq)``."""
        if tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"Expected integer token ids, but got dtype {tokens.dtype}.")
        seq = tokens.shape[1]
        if seq > self.max_len:
            raise ValueError(f"Expected sequences of at most {self.max_len} tokens, but got {seq}.")
        positions = torch.arange(seq, device=tokens.device)
        h = self.token_embedding(tokens) + self.position_embedding(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(seq, device=tokens.device)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.lm_head(self.norm(h))
