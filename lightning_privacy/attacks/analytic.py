"""Closed-form attacks as registered components.

``AnalyticLinear``, ``AnalyticPatchEmbedding`` and ``TokenLeakage``.

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
from lightning_privacy.functional.attacks.patch_embedding import analytic_patch_embedding


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


@ATTACKS.register("analytic_patch_embedding")
@dataclass(frozen=True)
class AnalyticPatchEmbedding(Attack):
    """Exact input recovery from a vision transformer's stem gradients alone.

    The position embedding's gradient is the tokens' gradient ``Δ``, and the linear patch
    embedding's is ``Δᵀ X``: the patches ``X`` follow by least squares, exactly when the token
    gradients are independent (:mod:`lightning_privacy.functional.attacks.patch_embedding`).
    One example at a time (the position gradient of a batch is the sum over it). The attack on
    the ``stem`` layer group that needs no optimisation.

    Args:
        patch_embed: Module name of the patch embedding (default: the first conv with
            kernel = stride).
        pos_embed: Parameter name of the position embedding (default: ``*pos_embed*``).
        tol: Largest relative mismatch between the summed token gradients and the bias gradient
            (the check that nothing transforms the tokens between the two embeddings); ``None``
            skips it, for a defended gradient whose noise breaks that identity.

    Example:
        >>> import timm, torch
        >>> from lightning_privacy.functional import parameter_gradients
        >>> from lightning_privacy.models.timm_models import layer_groups
        >>> _ = torch.manual_seed(0)
        >>> vit = timm.models.VisionTransformer(img_size=8, patch_size=4, num_classes=3,
        ...                                     embed_dim=16, depth=1, num_heads=2).eval()
        >>> x, y = torch.rand(1, 3, 8, 8), torch.tensor([2])
        >>> g = parameter_gradients(vit, x, y, loss_fn=torch.nn.functional.cross_entropy)
        >>> stem = {n: g[n] for n in layer_groups(vit)["stem"]}
        >>> rec = AnalyticPatchEmbedding().reconstruct(vit, stem, input_shape=(3, 8, 8),
        ...                                            num_samples=1)
        >>> float((rec.inputs - x).abs().max()) < 1e-4
        True
    """

    patch_embed: str | None = None
    pos_embed: str | None = None
    tol: float | None = 1e-3
    function = staticmethod(analytic_patch_embedding)
    common_arguments = ("labels", "loss_fn")

    def __post_init__(self) -> None:
        if self.tol is not None:
            check_float("tol", self.tol, low=0.0, low_open=True)


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
