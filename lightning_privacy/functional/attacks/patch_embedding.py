"""Exact input recovery from the stem of a vision transformer: the patch and position embeddings.

A ViT's stem maps the image to tokens ``t_p = W x_p + b + e_p``: ``x_p`` the ``p``-th patch
(flattened ``C·P·P`` values), ``W, b`` the linear patch embedding (a ``Conv2d`` with kernel =
stride = ``P``), ``e_p`` the learned position embedding. For one example the stem's gradients
are therefore

* ``∂L/∂e_p = ∂L/∂t_p =: Δ_p`` -- the position embedding's gradient *is* the tokens' gradient,
* ``∂L/∂W = Σ_p Δ_p x_pᵀ = Δᵀ X`` and ``∂L/∂b = Σ_p Δ_p``,

so the patches ``X`` solve the linear system ``Δᵀ X = ∂L/∂W``: exactly when the ``N`` token
gradients are linearly independent (``N <= D``, the embedding width), which holds generically.
The attack reads only the stem's gradients; ``∂L/∂b = Σ_p Δ_p`` checks that the position
embedding is added right after the patch embedding (no normalisation in between). This is the
case where the stem provably carries the input, and it is why the paper finds stem gradients the
most revealing of a ViT's layer groups (Table 6 of ``../shared/papers/002_*``: stem alone 67.4 dB
against 43.7 dB for the whole gradient).

Example:
    >>> import timm, torch
    >>> from lightning_privacy.functional.gradients import parameter_gradients
    >>> _ = torch.manual_seed(0)
    >>> vit = timm.models.VisionTransformer(img_size=8, patch_size=4, num_classes=3,
    ...                                     embed_dim=16, depth=1, num_heads=2).eval()
    >>> x = torch.rand(1, 3, 8, 8)
    >>> g = parameter_gradients(vit, x, torch.tensor([1]),
    ...                         loss_fn=torch.nn.functional.cross_entropy)
    >>> stem = {n: g[n] for n in ("pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")}
    >>> rec = analytic_patch_embedding(vit, stem, input_shape=(3, 8, 8), num_samples=1)
    >>> bool(torch.allclose(rec.inputs, x, atol=1e-4)), rec.metadata["token_rank"]
    (True, 4)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_privacy.functional.attacks.analytic import labels_or_none
from lightning_privacy.functional.attacks.common import (
    Gradients,
    LossFn,
    Reconstruction,
    Stopwatch,
    build_reconstruction,
    check_num_samples,
    resolve_gradients,
)

__all__ = ["analytic_patch_embedding", "find_patch_embedding", "find_position_embedding"]


def find_patch_embedding(model: nn.Module, name: str | None = None) -> str:
    """The module name of the linear patch embedding: ``name``, else the first patchifying conv.

    A patchifying convolution has kernel = stride, no padding, no dilation and one group.

    Raises:
        ValueError: If there is none (or ``name`` is not one).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten())
        >>> find_patch_embedding(net)
        '0'
    """
    modules = dict(model.named_modules())
    candidates = [name] if name is not None else list(modules)
    for candidate in candidates:
        module = modules.get(candidate)
        if _patchifies(module):
            return candidate
    where = f"`patch_embed={name!r}` is not" if name is not None else "the model has no"
    raise ValueError(
        f"Expected a linear patch embedding (an nn.Conv2d with kernel = stride, no padding, "
        f"dilation 1, one group), but {where} such a layer. Pass `patch_embed=` naming it."
    )


def _patchifies(module: nn.Module | None) -> bool:
    if not isinstance(module, nn.Conv2d):
        return False
    return (
        tuple(module.kernel_size) == tuple(module.stride)
        and tuple(module.dilation) == (1, 1)
        and module.groups == 1
        and module.padding in ("valid", (0, 0), 0)
    )


def find_position_embedding(target: dict[str, Tensor], width: int, name: str | None = None) -> str:
    """The observed parameter that is the learned position embedding, ``(1, T, width)``.

    ``name`` if given, else the observed parameter whose name contains ``pos_embed`` or
    ``position`` with that shape.

    Raises:
        ValueError: If its gradient is not among the observed ones.

    Example:
        >>> find_position_embedding({"pos_embed": torch.zeros(1, 5, 8)}, 8)
        'pos_embed'
    """
    names = [name] if name is not None else [n for n in target if _looks_positional(n)]
    for candidate in names:
        grad = target.get(candidate)
        if grad is not None and grad.ndim == 3 and grad.shape[0] == 1 and grad.shape[2] == width:
            return candidate
    raise ValueError(
        f"Expected the gradient of a learned position embedding of shape (1, tokens, {width}) "
        f"among the observed ones ({sorted(target)[:6]}), but found none"
        + (f" named {name!r}" if name is not None else "")
        + ". The attack needs it: it is the tokens' gradient. Pass `pos_embed=` naming it."
    )


def _looks_positional(name: str) -> bool:
    return "pos_embed" in name or "position" in name


def analytic_patch_embedding(
    model: nn.Module,
    gradients: Gradients,
    *,
    input_shape: Sequence[int],
    num_samples: int,
    labels: Tensor | None = None,
    loss_fn: LossFn = F.cross_entropy,
    patch_embed: str | None = None,
    pos_embed: str | None = None,
    tol: float | None = 1e-3,
) -> Reconstruction:
    """Recover one input exactly from a ViT's stem gradients (see the module docstring).

    Args:
        model: The attacked model (only its patch embedding's geometry is read).
        gradients: Observed gradient; the patch embedding's weight and the position embedding
            are read (its bias, when observed, checks the model's structure).
        input_shape: ``(C, H, W)`` of one input.
        num_samples: Must be 1: the position embedding's gradient sums the token gradients of
            a batch.
        labels: Returned as given, else read off the last linear layer when it is observed.
        loss_fn: Unused (closed form); kept for the common signature.
        patch_embed: Module name of the patch embedding (default: the first patchifying conv).
        pos_embed: Parameter name of the position embedding (default: the observed one named
            ``*pos_embed*`` or ``*position*``).
        tol: Largest relative mismatch between ``Σ_p Δ_p`` and the bias gradient; ``None``
            skips that check (a defended gradient: noise breaks the identity).

    Returns:
        The input ``(1, C, H, W)``; metadata: ``token_rank`` (the rank of ``Δ``; below the
        number of patches the system is under-determined and the least-norm solution is
        returned), ``prefix_tokens`` (class/register tokens before the patches).

    Raises:
        ValueError: For a batch, a model without a patch embedding or an observed position
            embedding, an input shape the patches do not tile, or a bias gradient that shows
            the tokens are transformed between the two embeddings.
    """
    if check_num_samples(num_samples) != 1:
        raise ValueError(
            "Expected `num_samples` = 1 for analytic_patch_embedding: the position embedding's "
            f"gradient sums the token gradients over a batch, but got {num_samples}."
        )
    clock = Stopwatch()
    target = resolve_gradients(model, gradients)
    layer = find_patch_embedding(model, patch_embed)
    conv = dict(model.named_modules())[layer]
    assert isinstance(conv, nn.Conv2d)
    grid = _patch_grid(conv, input_shape)
    deltas, prefix = _token_gradients(target, conv, pos_embed, grid)
    _check_prefix(model, prefix, input_shape)
    _check_bias(deltas, target.get(f"{layer}.bias"), tol)
    weight = target.get(f"{layer}.weight")
    if weight is None:
        raise ValueError(
            f"Expected the gradient of `{layer}.weight` among the observed ones, but got only "
            f"{sorted(target)[:6]}."
        )
    # on the CPU in float64: its lstsq driver returns the least-norm solution when Δ is rank
    # deficient (more patches than the embedding width), the CUDA one assumes full rank
    rows = deltas.T.detach().cpu().double()
    patches = torch.linalg.lstsq(
        rows, weight.reshape(len(weight), -1).cpu().double(), driver="gelsd"
    )
    inputs = _image_from_patches(patches.solution, conv, input_shape, grid).to(weight.device)
    return build_reconstruction(
        model,
        inputs=inputs.to(weight.dtype)[None],
        labels=labels_or_none(model, target, 1, labels),
        history=[],
        labels_known=labels is not None,
        attack="analytic_patch_embedding",
        layer=layer,
        token_rank=int(torch.linalg.matrix_rank(rows)),
        prefix_tokens=prefix,
        seconds=clock.seconds(),
    )


def _patch_grid(conv: nn.Conv2d, input_shape: Sequence[int]) -> tuple[int, int]:
    """``(rows, columns)`` of patches; the input must be ``(in_channels, k·rows, k·columns)``."""
    shape = tuple(int(s) for s in input_shape)
    ph, pw = conv.kernel_size
    if len(shape) != 3 or shape[0] != conv.in_channels or shape[1] % ph or shape[2] % pw:
        raise ValueError(
            f"Expected `input_shape` (C, H, W) with C = {conv.in_channels} and H, W multiples "
            f"of the patch size {ph}x{pw}, but got {shape}."
        )
    return shape[1] // ph, shape[2] // pw


def _token_gradients(
    target: dict[str, Tensor], conv: nn.Conv2d, pos_embed: str | None, grid: tuple[int, int]
) -> tuple[Tensor, int]:
    """``Δ`` (patches x width) from the position embedding's gradient, and the prefix length."""
    name = find_position_embedding(target, conv.out_channels, pos_embed)
    rows = target[name][0]
    patches = grid[0] * grid[1]
    prefix = len(rows) - patches
    if prefix < 0:
        raise ValueError(
            f"Expected the position embedding `{name}` to have at least one row per patch "
            f"({patches}), but it has {len(rows)}."
        )
    return rows[prefix:], prefix


def _check_bias(deltas: Tensor, bias: Tensor | None, tol: float | None) -> None:
    """Refuse token gradients that do not sum to the patch embedding's bias gradient."""
    if bias is None or tol is None:
        return
    mismatch = float((deltas.sum(0) - bias).norm() / bias.norm().clamp_min(1e-30))
    if mismatch > tol:
        raise ValueError(
            f"Expected the position embedding to be added right after the patch embedding "
            f"(its token gradients summing to the bias gradient within `tol` = {tol:g}), but "
            f"they differ by {mismatch:.2g} (relative): the tokens are transformed in "
            "between, or the gradient is defended (noise breaks the identity: pass "
            "`tol=None`)."
        )


def _check_prefix(model: nn.Module, prefix: int, input_shape: Sequence[int]) -> None:
    """Refuse an ``input_shape`` that leaves other rows than the model's prefix tokens.

    The rows before the patches are the class/register tokens (timm's ``num_prefix_tokens``);
    any other count means the input is not the size the model was built for.
    """
    expected = getattr(model, "num_prefix_tokens", None)
    if isinstance(expected, int) and prefix != expected:
        raise ValueError(
            f"Expected `input_shape` to give as many patches as the position embedding has rows "
            f"after the model's {expected} prefix token(s), but got {tuple(input_shape)}, which "
            f"leaves {prefix}: pass the input size the model was built for."
        )


def _image_from_patches(
    patches: Tensor, conv: nn.Conv2d, input_shape: Sequence[int], grid: tuple[int, int]
) -> Tensor:
    """``(rows·columns, C·ph·pw)`` row-major patches back into the ``(C, H, W)`` image."""
    (ph, pw), (rows, cols) = conv.kernel_size, grid
    channels = int(input_shape[0])
    blocks = patches.reshape(rows, cols, channels, ph, pw)
    return blocks.permute(2, 0, 3, 1, 4).reshape(channels, rows * ph, cols * pw)
