"""Gradients of a loss w.r.t. parameters, computed without touching the model's state.

The attacker's (and the I2F estimator's) view: ``torch.func.functional_call`` on detached copies
of the parameters, so no ``.grad`` is written, no DDP reducer hook fires and the optimizer never
sees anything.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 3)
    >>> grads = parameter_gradients(
    ...     model, torch.randn(2, 4), torch.tensor([0, 2]),
    ...     loss_fn=torch.nn.functional.cross_entropy)
    >>> sorted(grads), grads["weight"].shape
    (['bias', 'weight'], torch.Size([3, 4]))
    >>> model.weight.grad is None
    True
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


def select_parameters(
    model: nn.Module, layers: str | Sequence[str] | None = None
) -> dict[str, nn.Parameter]:
    """Trainable parameters of ``model`` whose names match ``layers``.

    Args:
        model: The module.
        layers: ``None`` for all trainable parameters; a regex (``re.search``) or a list of
            regexes, any of which may match.

    Returns:
        ``{name: parameter}`` in ``named_parameters`` order.

    Raises:
        ValueError: If a pattern matches no trainable parameter.

    Example:
        >>> sorted(select_parameters(torch.nn.Linear(2, 2), "bias"))
        ['bias']
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if layers is None:
        return params
    patterns = [layers] if isinstance(layers, str) else list(layers)
    for pattern in patterns:
        if not any(re.search(pattern, name) for name in params):
            raise ValueError(
                f"Expected each `layers` pattern to match at least one trainable parameter, but "
                f"{pattern!r} matched none. Parameter names look like: {list(params)[:5]}."
            )
    return {n: p for n, p in params.items() if any(re.search(pt, n) for pt in patterns)}


def parameter_gradients(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    loss_fn: LossFn,
    params: Mapping[str, Tensor] | None = None,
    create_graph: bool = False,
) -> dict[str, Tensor]:
    """Gradient of ``loss_fn(model(inputs), targets)`` w.r.t. ``params`` via ``functional_call``.

    Args:
        model: The module (its parameters and buffers are read, never written; BatchNorm
            running statistics are updated on clones). Dropout draws from the global RNG: wrap
            the call in ``torch.random.fork_rng`` to leave the training stream untouched.
        inputs: A batch of inputs.
        targets: Labels (or any second argument of ``loss_fn``).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        params: Parameters to differentiate (default: all trainable ones). Others are held fixed.
        create_graph: Keep the graph (for double backpropagation through the gradient).

    Returns:
        ``{name: gradient}`` for the selected parameters.
    """
    chosen = select_parameters(model) if params is None else params
    leaves = {n: p.detach().requires_grad_(True) for n, p in chosen.items()}
    # Buffers are cloned so that BatchNorm in train mode updates copies, never the model's stats.
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.enable_grad():
        outputs = torch.func.functional_call(model, {**buffers, **leaves}, (inputs,))
        loss = loss_fn(outputs, targets)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph)
    return dict(zip(leaves, grads, strict=True))


def gradient_product_input_grad(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    vectors: Mapping[str, Tensor],
    *,
    loss_fn: LossFn,
) -> Tensor:
    """``d/dx <grad_theta L(x), v>``: the input gradient of a gradient-matching objective.

    A gradient-matching attack needs ``J^T v`` with ``J = d(grad_theta L)/dx``. Instead of
    differentiating through the backward pass (double backpropagation), this differentiates a
    forward-mode directional derivative: ``<grad_theta L, v>`` is the derivative of ``L`` along
    ``v`` in parameter space (``torch.func.jvp``), and its input gradient comes from one reverse
    pass through that dual forward. Exact, and cheaper than double backward on CPU.

    Args:
        model: The module (read only; buffers are cloned).
        inputs: Inputs ``x`` at which to evaluate.
        targets: Second argument of ``loss_fn``.
        vectors: ``{name: v}`` for the parameters in the product; other parameters are fixed.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.

    Returns:
        A tensor shaped like ``inputs``.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.rand(1, 3), torch.tensor([1])
        >>> v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        >>> ce = torch.nn.functional.cross_entropy
        >>> fast = gradient_product_input_grad(model, x, y, v, loss_fn=ce)
        >>> xr = x.clone().requires_grad_()
        >>> g = parameter_gradients(model, xr, y, loss_fn=torch.nn.functional.cross_entropy,
        ...                         create_graph=True)
        >>> slow, = torch.autograd.grad(sum((g[n] * v[n]).sum() for n in g), xr)
        >>> torch.allclose(fast, slow, atol=1e-6)
        True
    """
    primals = {n: p.detach() for n, p in model.named_parameters() if n in vectors}
    if len(primals) != len(vectors):
        unknown = sorted(set(vectors) - set(primals))
        raise ValueError(f"Expected `vectors` to name parameters of the model, but got {unknown}.")
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in vectors}
    tangents = {n: vectors[n].detach() for n in primals}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    _load_forward_ad_decompositions()

    def directional(x: Tensor) -> Tensor:
        def loss_at(params: dict[str, Tensor]) -> Tensor:
            out = torch.func.functional_call(model, {**buffers, **fixed, **params}, (x,))
            return loss_fn(out, targets)

        return torch.func.jvp(loss_at, (primals,), (tangents,))[1]

    with torch.enable_grad():
        return torch.func.grad(directional)(inputs.detach())


class CachedGradient:
    """``parameter_gradients`` for many inputs at fixed weights, with the copies made once.

    Attacks evaluate the gradient thousands of times at the same weights; this detaches the
    parameters and clones the buffers once. *All* parameters are replaced by detached copies
    (only ``names`` require grad), so a backward pass through the result never reaches the
    model, whichever subset is differentiated.

    Args:
        model: The module (read only).
        names: Parameters to differentiate (default: all trainable ones), in output order.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> grad = CachedGradient(model, ["bias"])
        >>> g = grad(torch.randn(2, 4), torch.tensor([0, 2]),
        ...          loss_fn=torch.nn.functional.cross_entropy)
        >>> [t.shape for t in g], model.bias.grad is None
        ([torch.Size([3])], True)
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None) -> None:
        self.model = model
        self.names = list(select_parameters(model)) if names is None else list(names)
        chosen = set(self.names)
        self.params = {
            n: p.detach().requires_grad_(n in chosen) for n, p in model.named_parameters()
        }
        missing = chosen - set(self.params)
        if missing:
            raise ValueError(f"Expected parameter names of the model, but got {sorted(missing)}.")
        self.leaves = [self.params[n] for n in self.names]
        self.buffers = {n: b.clone() for n, b in model.named_buffers()}

    def __call__(
        self, inputs: Tensor, targets: Tensor, *, loss_fn: LossFn, create_graph: bool = False
    ) -> list[Tensor]:
        """Gradients of ``loss_fn(model(inputs), targets)`` w.r.t. the chosen parameters."""
        with torch.enable_grad():
            outputs = torch.func.functional_call(
                self.model, {**self.buffers, **self.params}, (inputs,)
            )
            loss = loss_fn(outputs, targets)
            grads = torch.autograd.grad(loss, self.leaves, create_graph=create_graph)
        return list(grads)


@functools.cache
def _load_forward_ad_decompositions() -> None:
    """Load PyTorch's forward-AD decompositions once, without its own deprecation warning.

    The first forward-mode AD call of a process imports them, and in torch 2.14 that import calls
    ``torch.jit.script``, which emits a ``FutureWarning`` from inside torch that a warnings filter
    would pin on the first attack of a run.
    """
    load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
    if load is None:  # pragma: no cover - other torch versions
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script", category=FutureWarning)
        load()


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` with its math backend inside the block.

    The fused kernels PyTorch picks by default (flash, memory-efficient, the CPU flash kernel)
    have no double backward and no forward-mode derivative, which gradient-matching attacks and
    the I2F need; the math backend is made of ordinary differentiable operations. timm, torchvision
    and Hugging Face attention layers call ``scaled_dot_product_attention``, so they need no change.

    Example:
        >>> q = torch.randn(1, 2, 4, 8, requires_grad=True)
        >>> with differentiable_attention():
        ...     out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        ...     (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        ...     (h,) = torch.autograd.grad(g.square().sum(), q)
        >>> h.shape
        torch.Size([1, 2, 4, 8])
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield
