"""Closed-form attacks: input recovery from a linear layer, token sets from embedding rows.

* :func:`analytic_linear` (Phong et al., 2017; Geiping et al., 2020, Sec. 3; Fowl et al.,
  "Robbing the Fed", ICLR 2022): for ``z = W x + b`` every row ``i`` has
  ``dL/dW_i = (dL/dz_i) x`` and ``dL/db_i = dL/dz_i``, so ``x = dL/dW_i / dL/db_i`` exactly for
  one sample. For a batch, a row is a single sample's input whenever only that sample reaches
  the row (``dL/dz_{n,i} = 0`` for the others, e.g. inactive ReLUs, or a one-hot-label output
  row whose other samples have ``p ~ 0``); such rows agree with each other and are grouped.
* :func:`token_leakage` (Zhu et al., 2019; Breaching's ``from-embedding`` recovery): the rows of
  the token-embedding gradient that are non-zero are exactly the tokens in the batch when the
  embedding is not tied to the output; with a tied output projection every row gets a dense
  ``sum_t p_{t,v} h_t`` term and the batch's tokens are the rows above the largest gap in the
  sorted row norms.

Example:
    >>> import torch
    >>> from lightning_privacy.functional.attacks.common import observed_gradients_of
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.ReLU(),
    ...                           torch.nn.Linear(6, 3))
    >>> x = torch.rand(1, 3, 2, 2)
    >>> rec = analytic_linear(net, observed_gradients_of(net, x, torch.tensor([1])),
    ...                       input_shape=(3, 2, 2), num_samples=1)
    >>> bool(torch.allclose(rec.inputs, x, atol=1e-5)), rec.labels.tolist()
    (True, [1])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_privacy.functional.attacks.common import (
    Gradients,
    LossFn,
    Reconstruction,
    Stopwatch,
    build_reconstruction,
    check_num_samples,
    given_or_restored_labels,
    resolve_gradients,
)


def first_linear(model: nn.Module, layer: str | None = None) -> str:
    """Name of the attacked linear layer: ``layer`` or the model's first parametrised module.

    Raises:
        ValueError: If that module is not an ``nn.Linear`` with a bias.

    Example:
        >>> first_linear(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2)))
        '1'
    """
    layer, module = _named_module(
        model, layer, lambda m: any(True for _ in m.parameters(recurse=False))
    )
    if not isinstance(module, nn.Linear) or module.bias is None:
        raise ValueError(
            "Expected the attacked layer to be an nn.Linear with a bias (the analytic attack "
            f"inverts `x = dW_i / db_i`), but got {type(module).__name__} at {layer!r}. Pass "
            "`layer=` naming such a layer that sees the input directly."
        )
    assert layer is not None
    return layer


def analytic_linear(
    model: nn.Module,
    gradients: Gradients,
    *,
    input_shape: Sequence[int],
    num_samples: int,
    labels: Tensor | None = None,
    loss_fn: LossFn = F.cross_entropy,
    layer: str | None = None,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> Reconstruction:
    """Recover inputs exactly from a linear layer with bias.

    Args:
        model: The attacked model; ``layer`` must see the (flattened) input directly.
        gradients: Observed gradient (only the layer's weight and bias are read).
        input_shape: Shape of one input (its product is the layer's ``in_features``).
        num_samples: Batch size.
        labels: Known labels; otherwise restored from the last linear layer.
        loss_fn: Unused (the attack is closed-form); kept for the common signature.
        layer: Module name of the linear layer; default the first parametrised module.
        tol: Rows with ``|db_i| <= tol * max|db|`` are ignored; candidates closer than
            ``sqrt(tol)`` (relative) are grouped as one sample.
        generator: Unused (deterministic).

    Returns:
        Inputs ``(num_samples, *input_shape)``; one sample: the least-squares estimate over
        all rows, ``sum_i db_i dW_i / sum_i db_i^2``; a batch: the centres of the
        ``num_samples`` largest groups of agreeing row estimates.

    Example:
        >>> from lightning_privacy.functional.attacks.common import observed_gradients_of
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> x = torch.rand(1, 3)
        >>> g = observed_gradients_of(net, x, torch.tensor([0]))
        >>> bool(torch.allclose(analytic_linear(net, g, input_shape=(3,), num_samples=1).inputs, x,
        ...                     atol=1e-5))
        True
    """
    num_samples = check_num_samples(num_samples)
    clock = Stopwatch()
    target = resolve_gradients(model, gradients)
    name = first_linear(model, layer)
    dw, db = _layer_gradients(target, name, input_shape)
    valid = db.abs() > tol * db.abs().max().clamp_min(1e-30)
    inputs, groups = _inputs_from_rows(dw[valid], db[valid], num_samples, input_shape, tol)
    return build_reconstruction(
        model,
        inputs=inputs,
        labels=labels_or_none(model, target, num_samples, labels),
        history=[],
        labels_known=labels is not None,
        attack="analytic_linear",
        layer=name,
        rows_used=int(valid.sum()),
        group_sizes=groups,
        seconds=clock.seconds(),
    )


def _layer_gradients(
    target: dict[str, Tensor], name: str, input_shape: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """The weight and bias gradients of linear layer ``name``, checked against ``input_shape``."""
    prefix = f"{name}." if name else ""
    dw, db = target[f"{prefix}weight"], target[f"{prefix}bias"]
    width = int(torch.tensor(input_shape).prod())
    if dw.shape[1] != width:
        raise ValueError(
            f"Expected `input_shape` {tuple(input_shape)} to have {dw.shape[1]} elements (the "
            f"layer's in_features), but it has {width}."
        )
    return dw, db


def _inputs_from_rows(
    rows: Tensor, bias: Tensor, num_samples: int, input_shape: Sequence[int], tol: float
) -> tuple[Tensor, list[int]]:
    """Inputs from the kept rows ``dW_i`` and ``db_i``, and how many rows each one stands on."""
    if not len(bias):  # a zero gradient (e.g. every row inactive) leaks nothing
        return torch.zeros(num_samples, *input_shape), [0] * num_samples
    if num_samples == 1:
        inputs = (bias[:, None] * rows).sum(0) / (bias**2).sum()
        return inputs.reshape(1, *input_shape), [len(bias)]
    inputs, groups = _grouped_rows(rows / bias[:, None], num_samples, tol**0.5)
    return inputs.reshape(num_samples, *input_shape), groups


def labels_or_none(
    model: nn.Module, target: dict[str, Tensor], num_samples: int, labels: Tensor | None
) -> Tensor | None:
    """The given labels, else those read off the last linear layer, else ``None`` (not seen).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> labels_or_none(net, {}, 1, None) is None, labels_or_none(net, {}, 1, torch.tensor([1]))
        (True, tensor([1]))
    """
    try:
        return given_or_restored_labels(model, target, num_samples, labels)
    except ValueError:
        return None


def _grouped_rows(candidates: Tensor, num_samples: int, tol: float) -> tuple[Tensor, list[int]]:
    """Centres of the ``num_samples`` largest groups of (relatively) equal candidate rows."""
    norms = candidates.norm(dim=1, keepdim=True).clamp_min(1e-30)
    distance = torch.cdist(candidates, candidates) / torch.minimum(norms, norms.T)
    close = distance <= tol
    remaining = torch.ones(len(candidates), dtype=torch.bool)
    centres: list[Tensor] = []
    sizes: list[int] = []
    while remaining.any() and len(centres) < num_samples:
        counts = (close & remaining[None, :] & remaining[:, None]).sum(1)
        counts[~remaining] = -1
        seed = int(counts.argmax())
        members = close[seed] & remaining
        centres.append(candidates[members].median(dim=0).values)
        sizes.append(int(members.sum()))
        remaining &= ~members
    while len(centres) < num_samples:  # fewer distinct groups than samples: pad with the mean
        centres.append(candidates.mean(0))
        sizes.append(0)
    return torch.stack(centres), sizes


def token_leakage(
    model: nn.Module,
    gradients: Gradients,
    *,
    input_shape: Sequence[int],
    num_samples: int,
    labels: Tensor | None = None,
    loss_fn: LossFn | None = None,
    embedding: str | None = None,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> Reconstruction:
    """The set of token ids in a text batch, from the rows of the token-embedding gradient.

    Args:
        model: A language model with an ``nn.Embedding`` for tokens.
        gradients: Observed gradient (only the embedding's weight gradient is read).
        input_shape: ``(seq_len,)``; at most ``num_samples * seq_len`` distinct tokens.
        num_samples: Sequences in the batch.
        labels: Unused (language modelling targets are the inputs).
        loss_fn: Unused.
        embedding: Module name of the token embedding; default the first ``nn.Embedding``.
        tol: Untied embedding: rows with norm ``> tol * max`` are present.
        generator: Unused.

    Returns:
        ``inputs``: sorted 1-D tensor of the recovered token ids; ``metadata["tied"]``.

    Example:
        >>> emb = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(),
        ...                           torch.nn.Linear(8, 3))
        >>> tokens = torch.tensor([[2, 7]])
        >>> from lightning_privacy.functional.gradients import parameter_gradients
        >>> g = parameter_gradients(emb, tokens, torch.tensor([1]), loss_fn=F.cross_entropy)
        >>> token_leakage(emb, g, input_shape=(2,), num_samples=1).inputs.tolist()
        [2, 7]
    """
    num_samples = check_num_samples(num_samples)
    clock = Stopwatch()
    target = resolve_gradients(model, gradients)
    embedding, weight = _token_embedding(model, embedding)
    key = f"{embedding}.weight"
    if key not in target:
        raise ValueError(f"Expected the gradient of `{key}` (the token embedding).")
    tied = any(isinstance(m, nn.Linear) and m.weight is weight for m in model.modules())
    max_tokens = min(num_samples * int(torch.tensor(input_shape).prod()), weight.shape[0])
    present = (
        _rows_above_gap(target[key], max_tokens)
        if tied
        else _untied_tokens(model, target, key, max_tokens, tol)
    )
    return build_reconstruction(
        model,
        inputs=present.sort().values,
        labels=None,
        history=[],
        labels_known=False,
        attack="token_leakage",
        tied=tied,
        embedding=embedding,
        seconds=clock.seconds(),
    )


def _named_module(
    model: nn.Module, name: str | None, default: Callable[[nn.Module], bool]
) -> tuple[str | None, nn.Module | None]:
    """Module ``name``, or without a name the first one ``default`` picks; ``None`` if absent."""
    modules = dict(model.named_modules())
    if name is None:
        name = next((n for n, m in modules.items() if default(m)), None)
    return name, modules.get(name) if name is not None else None


def _token_embedding(model: nn.Module, embedding: str | None) -> tuple[str, Tensor]:
    """Name and weight of the token embedding: ``embedding`` or the first ``nn.Embedding``."""
    embedding, module = _named_module(model, embedding, lambda m: isinstance(m, nn.Embedding))
    if not isinstance(module, nn.Embedding):
        raise ValueError(
            "Expected a model with a token nn.Embedding (token leakage attacks text models), but "
            f"found none at {embedding!r}."
        )
    assert embedding is not None
    return embedding, module.weight


def _untied_tokens(
    model: nn.Module, target: dict[str, Tensor], key: str, max_tokens: int, tol: float
) -> Tensor:
    """Tokens of an untied embedding: its non-zero gradient rows plus the head's standouts."""
    rows = target[key]
    norms = rows.norm(dim=1)
    present = (norms > tol * norms.max().clamp_min(1e-30)).nonzero().flatten()
    # The last token of each sequence is only a target: read it from the output head.
    out = _output_head(model, rows.shape[0])
    if out is not None and f"{out}.weight" in target:
        extra = _rows_above_gap(target[f"{out}.weight"], max_tokens)
        present = torch.unique(torch.cat([present, extra]))
    return present


def _output_head(model: nn.Module, vocab_size: int) -> str | None:
    """Name of the last linear layer with ``vocab_size`` outputs (the untied LM head)."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == vocab_size:
            found = name
    return found


def _rows_above_gap(rows: Tensor, max_tokens: int) -> Tensor:
    """Rows that stand out from the common softmax term, split at the largest norm gap.

    Every vocabulary row of an output-projection gradient carries ``sum_t p_{t,v} h_t``, which
    is nearly the same vector for all tokens of an untrained or uncertain model; rows of tokens
    in the batch add their own ``-h_t`` (targets) or input gradients. The coordinate-wise median
    row estimates the common part.
    """
    residual = (rows - rows.median(dim=0).values).norm(dim=1)
    order = residual.argsort(descending=True)
    top = residual[order][: max_tokens + 1].clamp_min(1e-30).log()
    gaps = top[:-1] - top[1:]
    count = int(gaps.argmax()) + 1 if len(gaps) else 1
    return order[:count]
