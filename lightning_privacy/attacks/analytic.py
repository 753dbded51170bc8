"""Closed-form attacks as registered components: ``AnalyticLinear`` and ``TokenLeakage``.

Example:
    >>> from lightning_privacy.attacks import create_attack
    >>> create_attack("token_leakage").modality, create_attack("analytic_linear").modality
    ('text', 'image')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightning_privacy._validation import check_float
from lightning_privacy.attacks.base import ATTACKS, Attack
from lightning_privacy.functional.attacks.analytic import analytic_linear, token_leakage


@ATTACKS.register("analytic_linear")
@dataclass(frozen=True)
class AnalyticLinear(Attack):
    """Exact input recovery from a linear layer with bias, ``x = dL/dW_i / dL/db_i``.

    Phong et al. (2017); Geiping et al. (NeurIPS 2020, Prop. 3.1); batches where rows are
    reached by one sample only: Fowl et al. ("Robbing the Fed", ICLR 2022). No iterations, no
    randomness; the labels come from the last linear layer (iDLG / Yin et al.).

    Args:
        layer: Name of the linear layer that sees the flattened input (default: the first
            parametrised module).
        tol: Relative threshold on ``|dL/db_i|`` and on row agreement.

    Example:
        >>> import torch
        >>> from lightning_privacy.functional.attacks import observed_gradients_of
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> x = torch.rand(1, 1, 2, 2)
        >>> g = observed_gradients_of(net, x, torch.tensor([0]))
        >>> rec = AnalyticLinear().reconstruct(net, g, input_shape=(1, 2, 2), num_samples=1)
        >>> bool(torch.allclose(rec.inputs, x, atol=1e-5))
        True
    """

    layer: str | None = None
    tol: float = 1e-4
    function = staticmethod(analytic_linear)
    common_arguments = ("labels", "loss_fn")

    def __post_init__(self) -> None:
        check_float("tol", self.tol, low=0.0, high=1.0, low_open=True)


@ATTACKS.register("token_leakage")
@dataclass(frozen=True)
class TokenLeakage(Attack):
    """The set of tokens in a text batch from the rows of the token-embedding gradient.

    Untied embeddings: the non-zero rows (inputs) plus the rows of the output head that stand
    out (the last token of each sequence is only a target). Tied embeddings: the rows that stand
    out from the common softmax term (median row), split at the largest gap in their norms.
    Zhu et al. (NeurIPS 2019) for text; Breaching's ``token_recovery: from-embedding``.

    Args:
        embedding: Module name of the token embedding (default: the first ``nn.Embedding``).
        tol: Relative row-norm threshold for the untied embedding.

    Example:
        >>> import torch
        >>> from lightning_privacy.models import TinyTransformerLM
        >>> from lightning_privacy.functional import parameter_gradients
        >>> _ = torch.manual_seed(0)
        >>> lm = TinyTransformerLM(vocab_size=60, d_model=16, n_layers=1, n_heads=2, max_len=6)
        >>> tokens = torch.randint(0, 60, (2, 6))
        >>> g = parameter_gradients(lm, tokens, tokens, loss_fn=lm.loss_fn)
        >>> rec = TokenLeakage().reconstruct(lm, g, input_shape=(6,), num_samples=2)
        >>> rec.inputs.tolist() == sorted(set(tokens.flatten().tolist()))
        True
    """

    embedding: str | None = None
    tol: float = 1e-6

    modality: ClassVar[str] = "text"
    function = staticmethod(token_leakage)
    common_arguments = ()

    def __post_init__(self) -> None:
        check_float("tol", self.tol, low=0.0, high=1.0, low_open=True)
