"""Batched products ``J Jᵀ V`` of the I2F Gram matrix, many columns per pass through the network.

``J = ∇_x ∇_θ L`` is the Jacobian of the parameter gradient ``g(x) = ∇_θ L(x)``. The gradient of a
``Linear`` or ``Conv2d`` layer is a bilinear function of the layer's input ``h`` and of the
gradient ``δ = ∂L/∂z`` at its output, ``G(h, δ) = Σ_p δ_p h̃_pᵀ`` (``h̃_p`` the input patch of
output position ``p``); an eval-mode ``BatchNorm`` is the same with ``h̃ = (h - μ) / s``. So, for
a direction ``v`` of the input,

* ``Jᵀ v = dG = Σ_p (δ̇_p h̃_pᵀ + δ_p h̃̇_pᵀ)`` needs only the tangents ``ḣ, δ̇`` of ``h`` and ``δ``
  along ``v``, and
* ``J (Jᵀ v) = ∇_x ⟨G(h(x), δ(x)), dG⟩ = (Dδ)ᵀ ψ + (Dh)ᵀ β`` with ``ψ = dG h̃`` (a convolution
  with the weights ``dG``) and ``β = dGᵀ δ`` (its transpose).

Two ways to get the tangents and to apply ``(Dδ)ᵀ, (Dh)ᵀ``, both batched over many ``v`` with
``vmap`` while the weights stay unbatched (every batched operation is an ordinary batched
convolution or matrix product):

* ``"curvature"`` (any network): forward-over-reverse passes, ``torch.func.jvp`` of the
  gradients at zero "probes" added at the layers' outputs and inputs, once for ``ḣ, δ̇`` and once
  with ``ψ, β`` as the probes' tangents. Parameters outside the rules (normalisation affines in
  train mode, LayerNorm, positional embeddings, class tokens, layers called through their weights
  rather than their ``forward``) are differentiated by ``torch.func`` directly, per direction.
* ``"piecewise_linear"`` (ReLU networks: ReLU, max-pooling, eval-mode BatchNorm, residual sums):
  there ``δ = Σ_c r_c ∂f_c/∂z`` with locally constant ``∂f_c/∂z``, so ``δ̇ = Σ_c (H J_x f v)_c
  ∂f_c/∂z`` (``f`` the outputs, ``r, H`` the loss's gradient and Hessian in them): one forward
  tangent pass and one backward pass through the forward graph, about three times cheaper. It is
  chosen only when every observed parameter is under a rule and ``δ̇`` computed both ways agrees
  on random directions (:meth:`GramProducts.is_piecewise_linear`).

The parameter-sized ``dG`` is formed per layer in one matrix product, or not at all when ``ψ`` and
``β`` are cheaper from the ``P x P`` Gram matrices of the positions (``3 P² (C + K)`` against
``4 P C K`` multiply-adds: late layers with few positions). The same Gauss-Newton form on the first
layers only (:meth:`GramProducts.prefix_gram`) is the preconditioner of the matrix-free solver.

The products are those of :meth:`~lightning_privacy.functional.leakage.LeakageOperator.\
gram_matvec` (same model, loss, observed parameters), organised differently; a check against it on
a random direction guards every operator (:meth:`GramProducts.agrees_with`).

Example:
    >>> import torch
    >>> torch.manual_seed(0) is not None
    True
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
    ...                             torch.nn.Linear(64, 3))
    >>> x, y = torch.randn(1, 1, 6, 6), torch.tensor([2])
    >>> products = GramProducts(model, x, y)
    >>> products.gram().shape, products.fallback, products.mode  # tanh: not piecewise linear
    (torch.Size([36, 36]), [], 'curvature')
"""

from __future__ import annotations

import contextlib
import math
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jvp, vjp, vmap

from lightning_privacy._validation import check_choice, check_int
from lightning_privacy.functional.leakage_stem import StemGram, stem_factors
from lightning_privacy.functional.patches import patches, unpatch

__all__ = ["MAX_GAUSS_NEWTON_OUTPUTS", "PREFIX_RATIO", "GramProducts", "MeasurementTimeoutError"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Progress = Callable[[int, int], None]

#: The preconditioner's layers hold this many times ``d_x`` observed parameters: a ResNet's stem
#: and first convolution at 32x32, the whole DLG LeNet (a shorter prefix of a sigmoid network
#: preconditions it far worse: 300 iterations to 1e-6 instead of 60).
PREFIX_RATIO = 8.0
#: Most output values for which the Gauss-Newton form keeps the loss-curvature part of ``δ̇``.
MAX_GAUSS_NEWTON_OUTPUTS = 256
#: Relative difference of ``δ̇`` (both ways, random directions) below which a network counts as
#: piecewise linear, per dtype (float32 rounding is ~1e-7 relative).
PIECEWISE_LINEAR_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2}


class MeasurementTimeoutError(TimeoutError):
    """A product loop passed its deadline (the caller keeps what it finished before).

    Example:
        >>> issubclass(MeasurementTimeoutError, TimeoutError)
        True
    """


class _StopForwardError(Exception):
    """Raised in a hook to end a forward pass once the layers needed have run."""


@dataclass(frozen=True)
class _Call:
    """One call of a layer with a rule, in call order.

    Attributes:
        name: The module's name in the model.
        kind: ``"linear"``, ``"conv"`` or ``"norm"`` (eval-mode BatchNorm).
        weight: Whether its weight is observed.
        bias: Whether its bias is observed.
        geometry: ``(kernel, dilation, padding, stride)`` of a convolution.
        input_shape: Shape of the call's input.
        output_shape: Shape of the call's output.
    """

    name: str
    kind: str
    weight: bool
    bias: bool
    geometry: tuple[Any, ...] | None
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def _conv_geometry(module: nn.Conv2d) -> tuple[Any, ...] | None:
    """``(kernel, dilation, padding, stride)`` of a plain convolution, else ``None``."""
    if module.groups != 1 or module.padding_mode != "zeros":
        return None
    padding: Any = module.padding
    if isinstance(padding, str):
        pairs = list(zip(module.dilation, module.kernel_size, strict=True))
        if padding == "valid":
            padding = (0, 0)
        elif all(d * (k - 1) % 2 == 0 for d, k in pairs):
            padding = tuple(d * (k - 1) // 2 for d, k in pairs)
        else:
            return None
    return (tuple(module.kernel_size), tuple(module.dilation), tuple(padding), module.stride)


def _kind(module: nn.Module) -> str | None:
    """Which rule handles ``module``, if any."""
    if type(module) is nn.Linear:
        return "linear"
    if type(module) is nn.Conv2d and _conv_geometry(module) is not None:
        return "conv"
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if type(module) in norms and not module.training and module.running_mean is not None:
        return "norm"  # eval mode with running statistics: affine in its input
    return None


def _ruled_modules(
    model: nn.Module, observed: Sequence[str]
) -> dict[str, tuple[nn.Module, str, bool, bool]]:
    """``{name: (module, kind, weight observed, bias observed)}`` of the layers with a rule.

    A layer qualifies when one of its parameters is observed and none of them is shared with
    another module (tied weights).
    """
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    wanted = set(observed)
    out: dict[str, tuple[nn.Module, str, bool, bool]] = {}
    for name, module in model.named_modules():
        kind = _kind(module)
        own = dict(module.named_parameters(recurse=False))
        if kind is None or any(counts[id(p)] > 1 for p in own.values()):
            continue
        prefix = f"{name}." if name else ""
        weight, bias = f"{prefix}weight" in wanted, f"{prefix}bias" in wanted
        if weight or bias:
            out[name] = (module, kind, weight, bias)
    return out


@contextlib.contextmanager
def _hooks(
    modules: Mapping[str, nn.Module], hook: Callable[[str, Any, Any], Any]
) -> Iterator[None]:
    """Forward hooks ``hook(name, args, output)`` on ``modules``, removed on exit."""
    handles = [
        m.register_forward_hook(lambda _, args, out, n=n: hook(n, args, out))
        for n, m in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _affine_norm_forward(module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """``(x - μ) / s · weight + bias`` with the running statistics (an eval-mode batch norm).

    On feature maps it is a depthwise 1x1 convolution: under ``vmap(jvp(...))`` PyTorch runs a
    broadcast multiply-add through its Python reference decompositions (30 calls, 1.25 ms for 9
    tangents of a 64x8x8 map) and the convolution natively (0.47 ms); on torchvision ResNet-18
    the batch norms had taken a fifth of every ``J Jᵀ`` product.
    """
    assert module.running_mean is not None and module.running_var is not None
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    shift = -module.running_mean * scale
    if module.bias is not None:
        shift = shift + module.bias
    if x.dim() in (3, 4):  # a per-channel 1x1 convolution: see the docstring
        conv = F.conv2d if x.dim() == 4 else F.conv1d
        kernel = scale.reshape(-1, *(1,) * (x.dim() - 1))
        return conv(x, kernel, shift, groups=len(scale))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


@contextlib.contextmanager
def _affine_norms(model: nn.Module) -> Iterator[None]:
    """Every eval-mode batch norm of ``model`` computed by :func:`_affine_norm_forward`.

    A module whose ``forward`` is already an instance attribute (set by its user, or by an
    enclosing call of this manager) is left as it is.
    """
    swapped = [m for m in model.modules() if _kind(m) == "norm" and "forward" not in vars(m)]
    for module in swapped:
        module.forward = types.MethodType(_affine_norm_forward, module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


def _gram_ghost(u: Tensor, d: Tensor, ut: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """``ψ = dG u`` and ``β = dGᵀ d`` per direction from the ``P x P`` Gram matrices of positions.

    Shapes: ``u (P, K)``, ``d (P, C)``, ``ut (m, P, K)``, ``dt (m, P, C)``; ``dG = dtᵀ u + dᵀ ut``.
    """
    alpha = (u @ u.T) @ dt + (u @ ut.transpose(1, 2)) @ d
    beta = (d @ dt.transpose(1, 2)) @ u + (d @ d.T) @ ut
    return alpha, beta


class GramProducts:
    """``J Jᵀ V`` for many directions ``V`` at once, through layer rules (see the module docs).

    Args:
        model: The network (read through ``functional_call``; hooks are added during a product and
            removed after it).
        inputs: The batch ``J`` is taken at (floating point).
        targets: Its targets.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        observed: Names of the observed parameters (default: every trainable one).
        mode: ``"auto"`` (piecewise linear when it checks out, else curvature), ``"curvature"``
            or ``"piecewise_linear"`` (no check: exact only for piecewise-linear networks).
        chunk_bytes: Memory one batch of directions may take (sets :attr:`chunk_size`).

    Attributes:
        fallback: Observed parameters differentiated by ``torch.func`` rather than by a rule.
        chunk_size: Directions per batched pass.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
        ...                             torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
        >>> products = GramProducts(model, torch.randn(1, 3), torch.tensor([1]))
        >>> products.fallback, products.matmul(torch.eye(3)).shape
        (['2.weight', '2.bias'], torch.Size([3, 3]))
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        *,
        loss_fn: LossFn = F.cross_entropy,
        observed: Sequence[str] | None = None,
        mode: str = "auto",
        chunk_bytes: int = 2**30,
    ) -> None:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        names = [n for n in (list(params) if observed is None else observed) if n in params]
        self.model, self.targets, self.loss_fn = model, targets, loss_fn
        self.x0 = inputs.detach()
        self.input_dim = self.x0.numel()
        self._buffers = {n: b.clone() for n, b in model.named_buffers()}
        ruled = _ruled_modules(model, names)
        self.calls = self._discover(ruled, params)
        self._modules = {c.name: ruled[c.name][0] for c in self.calls}
        covered = {
            (f"{n}." if n else "") + k
            for n, m in self._modules.items()
            for k, _ in m.named_parameters(recurse=False)
        }
        self.fallback = [n for n in names if n not in covered]
        self._free = {n: params[n] for n in self.fallback}
        self._fixed = {n: p for n, p in params.items() if n not in self._free}
        like: dict[str, Any] = {"dtype": self.x0.dtype, "device": self.x0.device}
        self._probes = [torch.zeros(c.output_shape, **like) for c in self.calls]
        self._qs = [torch.zeros(c.input_shape, **like) for c in self.calls]
        self._primal: list[tuple[Tensor, Tensor]] | None = None
        self._signals_cache: tuple[Tensor | None, Tensor | None, list[Tensor]] | None = None
        self._pulls: dict[int, Callable[..., Any]] = {}
        self._mode = check_choice("mode", mode, ("auto", "curvature", "piecewise_linear"))
        self.chunk_size = self._chunk_size(check_int("chunk_bytes", chunk_bytes, low=1))

    def _discover(
        self, ruled: Mapping[str, tuple[nn.Module, str, bool, bool]], params: Mapping[str, Tensor]
    ) -> list[_Call]:
        """The calls of the ruled layers in one forward pass; layers called oddly are dropped."""
        seen: list[tuple[str, Any, Any]] = []
        odd: set[str] = set()

        def record(name: str, args: Any, out: Any) -> None:
            ok = len(args) == 1 and isinstance(args[0], Tensor) and isinstance(out, Tensor)
            seen.append((name, args[0] if ok else None, out if ok else None))
            if not ok or (ruled[name][1] == "norm" and args[0].dim() < 2):
                odd.add(name)

        modules = {n: entry[0] for n, entry in ruled.items()}
        with torch.no_grad(), _hooks(modules, record):
            functional_call(self.model, {**self._buffers, **params}, (self.x0,))
        calls = []
        for name, h, z in seen:
            if name not in odd:
                module, kind, weight, bias = ruled[name]
                geometry = _conv_geometry(module) if kind == "conv" else None  # type: ignore[arg-type]
                calls.append(
                    _Call(name, kind, weight, bias, geometry, tuple(h.shape), tuple(z.shape))
                )
        return calls

    @property
    def mode(self) -> str:
        """``"piecewise_linear"`` or ``"curvature"`` (``"auto"`` is resolved on first use)."""
        if self._mode == "auto":
            self._mode = "piecewise_linear" if self.is_piecewise_linear() else "curvature"
        return self._mode

    def _chunk_size(self, budget: int) -> int:
        """Directions per pass: about ``budget`` bytes of tangents, patches and ``dG``."""
        per = sum(self._per_direction(c) for c in self.calls)
        per += 4 * sum(p.numel() for p in self._free.values())
        per = max(per, 16 * self.input_dim)
        return max(1, min(256, self.input_dim, budget // (self.x0.element_size() * per)))

    def _per_direction(self, call: _Call) -> int:
        """Values per direction one call holds during a batched pass (a generous estimate)."""
        p, k, c = self._factor_shape(call)
        size = 12 * (math.prod(call.input_shape) + math.prod(call.output_shape)) + 3 * p * k
        return size + (c * k if self._explicit(call) else 2 * p * p)

    def _factor_shape(self, call: _Call) -> tuple[int, int, int]:
        """``(P, K, C)``: positions, input values per position, outputs per position."""
        if call.kind == "norm":
            c = call.output_shape[1]
            return math.prod(call.output_shape) // c, c, c
        if call.kind == "linear":
            k, c = call.input_shape[-1], call.output_shape[-1]
            return math.prod(call.output_shape) // c, k, c
        assert call.geometry is not None
        kernel, c = call.geometry[0], call.output_shape[1]
        return math.prod(call.output_shape) // c, call.input_shape[1] * kernel[0] * kernel[1], c

    def _explicit(self, call: _Call) -> bool:
        """Form ``dG`` (``4 P C K``) unless the ghost form (``3 P² (C + K)``) is cheaper."""
        p, k, c = self._factor_shape(call)
        repeated = sum(other.name == call.name for other in self.calls) > 1
        return repeated or 4 * c * k <= 3 * p * (c + k)

    def _forward(self, x: Tensor, parameters: Mapping[str, Tensor]) -> Any:
        """The model at ``parameters``, its eval-mode batch norms as plain affine maps.

        The same function (``agrees_with`` checks the products against the reference), but
        forward-mode AD through ``aten::native_batch_norm`` decomposes into many small
        operations: on torchvision ResNet-18 the affine form makes every product a third cheaper.
        """
        with _affine_norms(self.model):
            return functional_call(self.model, dict(parameters), (x,))

    def _parameters(self, free: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        return {**self._buffers, **self._fixed, **(self._free if free is None else free)}

    # --- the curvature engine: forward-over-reverse through the gradients -------------------

    def _loss(self, x: Tensor, probes: list[Tensor], qs: list[Tensor], free: dict) -> Tensor:
        """``L`` with zero probes added at the layers' outputs, plus ``Σ ⟨h, q⟩`` at their inputs.

        ``∂/∂probe = δ`` and ``∂/∂q = h``: the quantities the rules need, as gradients.
        """
        extra: list[Tensor] = []
        counter = iter(range(len(self.calls)))

        def hook(name: str, args: Any, out: Tensor) -> Tensor:
            i = next(counter)
            extra.append((args[0] * qs[i]).sum())
            return out + probes[i]

        with _hooks(self._modules, hook):
            outputs = self._forward(x, self._parameters(free))
        loss = self.loss_fn(outputs, self.targets)
        return loss + sum(extra) if extra else loss

    def _inner_gradients(self, x: Tensor) -> tuple[Any, Any, Any]:
        """``(δ per call, h per call, ∇ of the fallback parameters)`` at ``x``."""
        return grad(self._loss, argnums=(1, 2, 3))(x, self._probes, self._qs, self._free)

    def _input_gradient(self, probes: list[Tensor], qs: list[Tensor], free: dict) -> Tensor:
        return grad(self._loss, argnums=0)(self.x0, probes, qs, free)

    def _curvature_tangents(self, rows: Tensor) -> tuple[Any, Any, Any]:
        """``(δ̇, ḣ, ġ of the fallback parameters)`` along every row, forward-over-reverse."""
        x0 = self.x0

        def tangents(v: Tensor) -> Any:
            return jvp(self._inner_gradients, (x0,), (v.reshape(x0.shape),))[1]

        with torch.enable_grad():
            return vmap(tangents)(rows)

    def _curvature_chunk(self, rows: Tensor) -> Tensor:
        dts, hts, frees = self._curvature_tangents(rows)
        alphas, betas = self._rules(dts, hts)

        def products(a: list, b: list, f: dict) -> Tensor:
            primals = (self._probes, self._qs, self._free)
            return jvp(self._input_gradient, primals, (a, b, f))[1]

        with torch.enable_grad():
            out = vmap(products)(alphas, betas, frees)
        return out.reshape(len(rows), -1)

    # --- the rules ----------------------------------------------------------------------------

    def _factors(self, i: int, h: Tensor, d: Tensor, *, tangent: bool = False) -> tuple:
        """Call ``i``'s input factors ``(…, P, K)`` and output gradients ``(…, P, C)``."""
        call = self.calls[i]
        lead = h.shape[: h.dim() - len(call.input_shape)]  # the direction axis, if any
        if call.kind == "linear":
            k, c = call.input_shape[-1], call.output_shape[-1]
            return h.reshape(*lead, -1, k), d.reshape(*lead, -1, c)
        if call.kind == "norm":
            mean, std = self._norm_statistics(call.name)
            u = (h if tangent else h - _channels(mean, h, lead)) / _channels(std, h, lead)
            return _channels_last(u, lead), _channels_last(d, lead)
        assert call.geometry is not None
        u = patches(h.reshape(-1, *call.input_shape[1:]), call.geometry)  # (n·B, P, K)
        return u.reshape(*lead, -1, u.shape[-1]), self._gradient_factor(i, d, lead)

    def _gradient_factor(self, i: int, d: Tensor, lead: Sequence[int]) -> Tensor:
        """Output gradients ``(…, P, C)`` of a ``Linear`` or ``Conv2d`` call ``i``."""
        call = self.calls[i]
        if call.kind == "linear":
            return d.reshape(*lead, -1, call.output_shape[-1])
        g = d.reshape(*lead, *call.output_shape[:2], -1).transpose(-1, -2)  # (…, B, P, C)
        return g.reshape(*lead, -1, g.shape[-1])

    def _norm_statistics(self, name: str) -> tuple[Tensor, Tensor]:
        module = self._modules[name]
        prefix = f"{name}." if name else ""
        mean, var = self._buffers[f"{prefix}running_mean"], self._buffers[f"{prefix}running_var"]
        return mean, torch.sqrt(var + module.eps)  # type: ignore[operator]

    def _unfactor(self, i: int, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        """``ψ`` in the call's output shape and ``β`` in its input shape (``m`` directions)."""
        call = self.calls[i]
        m, b = alpha.shape[0], call.input_shape[0]
        if call.kind == "linear":
            return alpha.reshape(m, *call.output_shape), beta.reshape(m, *call.input_shape)
        if call.kind == "norm":
            std = self._norm_statistics(call.name)[1]
            a = _channels_first(alpha, call.output_shape, m)
            return a, _channels_first(beta, call.input_shape, m) / _channels(std, a, (m,))
        assert call.geometry is not None
        a = alpha.reshape(m, b, -1, alpha.shape[-1]).transpose(-1, -2)
        folded = unpatch(
            beta.reshape(m * b, -1, beta.shape[-1]), call.geometry, call.input_shape[1:]
        )
        return a.reshape(m, *call.output_shape), folded.reshape(m, *call.input_shape)

    def _rules(
        self, dts: Sequence[Tensor], hts: Sequence[Tensor], count: int | None = None
    ) -> tuple[list, list]:
        """The probes' tangents ``(ψ, β)`` of the first ``count`` calls from ``δ̇, ḣ``."""
        self._prepare()
        assert self._primal is not None
        count = len(self.calls) if count is None else count
        tangent = [self._factors(i, hts[i], dts[i], tangent=True) for i in range(count)]
        alphas, betas = [], []
        for i, call in enumerate(self.calls[:count]):
            group = [j for j, c in enumerate(self.calls[:count]) if c.name == call.name]
            alpha, beta = self._rule(i, group, tangent)
            a, b = self._unfactor(i, alpha, beta)
            alphas.append(a)
            betas.append(b)
        return alphas, betas

    def _rule(self, i: int, group: list[int], tangent: list) -> tuple[Tensor, Tensor]:
        """``ψ = ∂_δ⟨G, dG⟩``, ``β = ∂_h⟨G, dG⟩`` of call ``i`` (``dG`` over its ``group``)."""
        assert self._primal is not None
        call, (u, d), (ut, dt) = self.calls[i], self._primal[i], tangent[i]
        alpha, beta = torch.zeros_like(dt), torch.zeros_like(ut)
        if call.weight and call.kind == "norm":
            scale = sum((tangent[j][1] * self._primal[j][0]).sum(1, keepdim=True) for j in group)
            scale = scale + sum((self._primal[j][1] * tangent[j][0]).sum(1) for j in group)[:, None]
            alpha, beta = scale * u, scale * d
        elif call.weight and self._explicit(call):
            dg = sum(tangent[j][1].transpose(1, 2) @ self._primal[j][0] for j in group)
            dg = dg + sum(self._primal[j][1].T @ tangent[j][0] for j in group)
            alpha, beta = u @ dg.transpose(1, 2), d @ dg
        elif call.weight:
            alpha, beta = _gram_ghost(u, d, ut, dt)
        if call.bias:
            alpha = alpha + sum(tangent[j][1].sum(1, keepdim=True) for j in group)
        return alpha, beta

    def _prepare(self) -> None:
        """The primal factors of every call (computed once, reused by every batch)."""
        if self._primal is not None:
            return
        with torch.enable_grad():
            deltas, hs, _ = self._inner_gradients(self.x0)
        self._primal = [
            (u.detach(), d.detach())
            for u, d in (
                self._factors(i, h, d) for i, (h, d) in enumerate(zip(hs, deltas, strict=True))
            )
        ]

    # --- the Gauss-Newton engine: one forward tangent pass and one backward pass -----------

    def _outputs(self, x: Tensor, probes: list[Tensor]) -> Tensor:
        """The model's outputs with ``probes`` added at the ruled layers' outputs."""
        counter = iter(range(len(self.calls)))

        def hook(name: str, args: Any, out: Tensor) -> Tensor:
            return out + probes[next(counter)]

        with _hooks(self._modules, hook):
            return self._forward(x, self._parameters())

    def _signals(self) -> tuple[Tensor | None, Tensor | None, list[Tensor]]:
        """``J_x f (C, d_x)``, the loss Hessian ``H (C, C)`` in the outputs, ``∂f_c/∂z`` per call.

        ``(None, None, [])`` for more than :data:`MAX_GAUSS_NEWTON_OUTPUTS` output values.
        """
        if self._signals_cache is None:
            with torch.enable_grad():
                out, pull = vjp(self._outputs, self.x0, self._probes)[:2]
                c = out.numel()
                if c > MAX_GAUSS_NEWTON_OUTPUTS:
                    self._signals_cache = (None, None, [])
                    return self._signals_cache
                eye = torch.eye(c, dtype=out.dtype, device=out.device).reshape(c, *out.shape)
                jx, signals = vmap(pull)(eye)
                hess = hessian(lambda f: self.loss_fn(f, self.targets))(out.detach())
            self._signals_cache = (
                jx.reshape(c, -1).detach(),
                hess.reshape(c, c).detach(),
                [b.detach() for b in signals],
            )
        return self._signals_cache

    def _layer_inputs(self, x: Tensor, count: int) -> list[Tensor]:
        """The inputs of the first ``count`` ruled calls; the forward pass stops after them."""
        captured: list[Tensor] = []

        def hook(name: str, args: Any, out: Tensor) -> None:
            captured.append(args[0])
            if len(captured) == count:
                raise _StopForwardError

        with _hooks(self._modules, hook), contextlib.suppress(_StopForwardError):
            self._forward(x, self._parameters())
        return captured

    def _pull(self, count: int) -> Callable[..., Any]:
        """The VJP of ``x -> inputs of the first count calls`` (its graph built once)."""
        if count not in self._pulls:
            with torch.enable_grad():
                self._pulls[count] = vjp(lambda x: self._layer_inputs(x, count), self.x0)[1]
        return self._pulls[count]

    def _gauss_newton_deltas(self, rows: Tensor, count: int) -> list[Tensor]:
        """``δ̇ = Σ_c (H J_x f v)_c ∂f_c/∂z`` of the first ``count`` calls (zero without ``H``)."""
        jx, hess, outs = self._signals()
        if jx is None or hess is None:
            return [rows.new_zeros(len(rows), *c.output_shape) for c in self.calls[:count]]
        w = (rows @ jx.T) @ hess
        return [(w @ b.reshape(len(b), -1)).reshape(len(rows), *b.shape[1:]) for b in outs[:count]]

    def _gauss_newton_chunk(self, rows: Tensor, count: int) -> Tensor:
        """Columns of the Gauss-Newton Gram matrix of the first ``count`` calls along ``rows``."""
        x0, m = self.x0, len(rows)

        def tangents(v: Tensor) -> Any:
            return jvp(lambda x: self._layer_inputs(x, count), (x0,), (v.reshape(x0.shape),))[1]

        with torch.enable_grad():
            hts = vmap(tangents)(rows)
        alphas, betas = self._rules(self._gauss_newton_deltas(rows, count), hts, count)
        with torch.enable_grad():
            cols = vmap(self._pull(count))(betas)[0].reshape(m, -1)
        jx, hess, outs = self._signals()
        if jx is not None and hess is not None:
            pairs = zip(alphas, outs[:count], strict=True)
            s = sum(a.reshape(m, -1) @ b.reshape(len(b), -1).T for a, b in pairs)
            cols = cols + (s @ hess) @ jx
        return cols

    def is_piecewise_linear(self, *, directions: int = 2, seed: int = 0) -> bool:
        """Whether ``δ̇`` from the Gauss-Newton form equals the true one on random directions.

        True for ReLU networks (their ``∂f/∂z`` is locally constant) when every observed
        parameter is under a rule; false for sigmoid, tanh, GELU, softmax attention, LayerNorm.

        Example:
            >>> relu = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(),
            ...                            torch.nn.Linear(8, 2))
            >>> tanh = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
            ...                            torch.nn.Linear(8, 2))
            >>> x, y = torch.randn(1, 3), torch.tensor([0])
            >>> GramProducts(relu, x, y).is_piecewise_linear()
            True
            >>> GramProducts(tanh, x, y).is_piecewise_linear()
            False
        """
        if self.fallback or not self.calls or self._signals()[0] is None:
            return False
        gen = torch.Generator(device=self.x0.device).manual_seed(seed)
        rows = torch.randn(
            directions, self.input_dim, generator=gen, device=self.x0.device, dtype=self.x0.dtype
        )
        true = self._curvature_tangents(rows)[0]
        model = self._gauss_newton_deltas(rows, len(self.calls))
        pairs = zip(true, model, strict=True)
        diff = math.sqrt(sum(float((a - b).double().norm() ** 2) for a, b in pairs))
        size = math.sqrt(sum(float(a.double().norm() ** 2) for a in true))
        tol = PIECEWISE_LINEAR_TOL.get(self.x0.dtype, 1e-4)
        return math.isfinite(diff) and diff <= tol * max(size, 1e-300)

    # --- products -----------------------------------------------------------------------------

    def _chunk(self, rows: Tensor) -> Tensor:
        self._prepare()
        if self.mode == "piecewise_linear":
            out = self._gauss_newton_chunk(rows, len(self.calls))
        else:
            out = self._curvature_chunk(rows)
        return out.detach()

    def matmul(self, directions: Tensor) -> Tensor:
        """``J Jᵀ v`` for every row ``v`` of a ``(k, d_x)`` tensor, :attr:`chunk_size` at a time.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
            ...                             torch.nn.Linear(4, 2))
            >>> GramProducts(model, torch.randn(1, 3), torch.tensor([0])).matmul(
            ...     torch.zeros(5, 3)).abs().sum().item()
            0.0
        """
        rows = directions.reshape(-1, self.input_dim).to(self.x0.dtype)
        step = self.chunk_size
        return torch.cat([self._chunk(rows[i : i + step]) for i in range(0, len(rows), step)])

    def _columns(
        self,
        chunk: Callable[[Tensor], Tensor],
        step: int,
        deadline: float | None,
        progress: Progress | None,
        what: str,
    ) -> Tensor:
        """The symmetrised float64 matrix whose rows ``chunk`` returns for unit directions."""
        n = self.input_dim
        out = torch.empty(n, n, dtype=torch.float64, device=self.x0.device)
        eye = torch.eye(n, dtype=self.x0.dtype, device=self.x0.device)
        for i in range(0, n, step):
            if deadline is not None and time.perf_counter() > deadline:
                raise MeasurementTimeoutError(f"stopped after {i} of {n} columns of {what}")
            out[i : i + step] = chunk(eye[i : i + step])
            if progress is not None:
                progress(min(n, i + step), n)
        return (out + out.T) / 2

    def gram(self, *, deadline: float | None = None, progress: Progress | None = None) -> Tensor:
        """The dense ``d_x x d_x`` Gram matrix ``J Jᵀ`` in float64 (symmetrised).

        Args:
            deadline: ``time.perf_counter()`` value after which no further batch starts
                (:class:`MeasurementTimeoutError` is raised instead).
            progress: Called with ``(columns done, d_x)`` after each batch.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
            ...                             torch.nn.Linear(4, 2))
            >>> g = GramProducts(model, torch.randn(1, 3), torch.tensor([0])).gram()
            >>> g.dtype, bool((g == g.T).all())
            (torch.float64, True)
        """
        return self._columns(self._chunk, self.chunk_size, deadline, progress, "J Jᵀ")

    def prefix_count(self, ratio: float = PREFIX_RATIO) -> int:
        """Calls of the shortest prefix of layers holding ``ratio * d_x`` observed parameters.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
            ...                             torch.nn.Linear(4, 2))
            >>> products = GramProducts(model, torch.randn(1, 3), torch.tensor([0]))
            >>> products.prefix_count(), products.prefix_count(ratio=1.0)
            (2, 1)
        """
        total, seen = 0, set()
        for i, call in enumerate(self.calls):
            if call.name not in seen:
                seen.add(call.name)
                own = dict(self._modules[call.name].named_parameters(recurse=False))
                total += own["weight"].numel() if call.weight else 0
                total += own["bias"].numel() if call.bias else 0
            if total >= ratio * self.input_dim:
                return i + 1
        return len(self.calls)

    def prefix_gram(self, *, ratio: float = PREFIX_RATIO, deadline: float | None = None) -> Tensor:
        """``J_S J_Sᵀ`` of the first layers ``S`` (:meth:`prefix_count`), Gauss-Newton form.

        Exact for a piecewise-linear network and a symmetric positive semi-definite approximation
        otherwise; the passes stop after ``S``, so it costs a fraction of :meth:`gram`. The
        preconditioner of :class:`~lightning_privacy.functional.leakage.PreconditionedGramSolver`.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(),
            ...                             torch.nn.Linear(8, 2))
            >>> x, y = torch.randn(1, 3), torch.tensor([1])
            >>> products = GramProducts(model, x, y, observed=["0.weight", "0.bias"])
            >>> bool(torch.allclose(products.prefix_gram(), products.gram(), atol=1e-6))
            True
        """
        count = self.prefix_count(ratio)
        if count == 0:
            n = self.input_dim
            return torch.zeros(n, n, dtype=torch.float64, device=self.x0.device)
        self._prepare()

        def chunk(rows: Tensor) -> Tensor:
            return self._gauss_newton_chunk(rows, count).detach()

        return self._columns(chunk, 4 * self.chunk_size, deadline, None, "the preconditioner")

    def reads_input(self) -> bool:
        """Whether the first ruled call is a single ``Conv2d``/``Linear`` call on ``x`` unchanged.

        Its input must equal ``x`` (same values, same order) and move like ``x`` along a random
        direction (a normalisation or a ReLU in front would not).

        Example:
            >>> flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
            >>> scaled = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Tanh(),
            ...                              torch.nn.Linear(4, 2))
            >>> x, y = torch.randn(1, 2, 2), torch.tensor([0])
            >>> GramProducts(flat, x, y).reads_input(), GramProducts(scaled, x, y).reads_input()
            (True, False)
        """
        if not self.calls or self.calls[0].kind == "norm":
            return False
        if sum(c.name == self.calls[0].name for c in self.calls) > 1:
            return False
        gen = torch.Generator(device=self.x0.device).manual_seed(0)
        v = torch.randn(self.x0.shape, generator=gen, device=self.x0.device, dtype=self.x0.dtype)
        with torch.enable_grad():
            h, ht = jvp(lambda x: self._layer_inputs(x, 1)[0], (self.x0,), (v,))[:2]
        same = h.numel() == self.input_dim and torch.equal(h.reshape(-1), self.x0.reshape(-1))
        return same and torch.equal(ht.reshape(-1), v.reshape(-1))

    def stem_can_span(self) -> bool:
        """:attr:`~.leakage_stem.StemGram.spans_input`'s size test, from the shapes alone.

        Checked before the stem is built: its block has ``m²`` entries for the ``m`` values of a
        channel, which a large image makes too big to form (``m`` = 50,176 at 224x224).

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
            >>> GramProducts(model, torch.randn(1, 4), torch.tensor([0])).stem_can_span()
            True
        """
        if not self.calls or not self.calls[0].weight:
            return False
        call = self.calls[0]
        if call.kind == "linear":
            values, outputs = math.prod(call.input_shape[:-1]), call.output_shape[-1]
        elif call.kind == "conv" and call.geometry is not None:
            b, _, h, w = call.input_shape
            (kh, kw) = call.geometry[0]
            values, outputs = b * h * w, call.output_shape[1] * kh * kw
        else:
            return False
        return outputs >= values

    def stem_factors(self) -> StemGram | None:
        """The first layer's Gram matrix in closed form (:mod:`.leakage_stem`), or ``None``.

        The Gauss-Newton form of :meth:`prefix_gram` for that one layer (the same matrix), in
        factors and without its ``d_x`` column passes; ``None`` unless :meth:`reads_input`.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(),
            ...                             torch.nn.Flatten(), torch.nn.Linear(8, 3))
            >>> products = GramProducts(model, torch.randn(1, 1, 4, 4), torch.tensor([1]))
            >>> one_layer = products.prefix_gram(ratio=1e-9)  # the generic form, first layer
            >>> bool(torch.allclose(products.stem_factors().dense(), one_layer, atol=1e-6))
            True
        """
        if not self.reads_input():
            return None
        self._prepare()
        assert self._primal is not None
        u, d = self._primal[0]
        jx, hess, outs = self._signals()
        call = self.calls[0]
        signals = None if jx is None else self._gradient_factor(0, outs[0], (len(outs[0]),))
        return stem_factors(
            call.kind,
            call.geometry,
            call.input_shape,
            u,
            d,
            output_signals=signals,
            output_jacobian=jx,
            loss_hessian=hess,
            weight=call.weight,
            bias=call.bias,
        )

    def stem_gram(self) -> Tensor | None:
        """:meth:`stem_factors` as a dense ``d_x x d_x`` matrix, or ``None``.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
            >>> GramProducts(model, torch.randn(1, 4), torch.tensor([0])).stem_gram().shape
            torch.Size([4, 4])
        """
        stem = self.stem_factors()
        return None if stem is None else stem.dense()

    def prefix_columns(self, directions: Tensor, *, ratio: float = PREFIX_RATIO) -> Tensor:
        """Rows ``J_S J_Sᵀ v`` of :meth:`prefix_gram` for the rows ``v`` of ``directions``.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(),
            ...                             torch.nn.Linear(8, 2))
            >>> products = GramProducts(model, torch.randn(1, 3), torch.tensor([1]))
            >>> products.prefix_columns(torch.eye(3)).shape
            torch.Size([3, 3])
        """
        rows = directions.reshape(-1, self.input_dim).to(self.x0.dtype)
        count = self.prefix_count(ratio)
        if count == 0:
            return torch.zeros(len(rows), self.input_dim, dtype=torch.float64)
        self._prepare()
        return self._gauss_newton_chunk(rows, count).detach().to(torch.float64)

    def agrees_with(
        self, jt: Callable[[Tensor], Tensor], *, tol: float = 1e-3, seed: int = 0
    ) -> bool:
        """Whether ``vᵀ J Jᵀ v`` matches ``‖Jᵀ v‖²`` from ``jt`` on one random ``v``.

        A layer whose weights are also used outside its ``forward`` would break the rules; this
        check, on the reference product, catches it.

        Example:
            >>> from lightning_privacy.functional.leakage import LeakageOperator
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
            ...                             torch.nn.Linear(4, 2))
            >>> x, y = torch.randn(1, 3), torch.tensor([0])
            >>> GramProducts(model, x, y).agrees_with(LeakageOperator(model, x, y).jt)
            True
        """
        gen = torch.Generator(device=self.x0.device).manual_seed(seed)
        v = torch.randn(self.input_dim, generator=gen, device=self.x0.device, dtype=self.x0.dtype)
        fast = float(self.matmul(v[None])[0].double() @ v.double())
        reference = float(jt(v).double().norm() ** 2)
        if not (math.isfinite(fast) and math.isfinite(reference)):
            return False
        return abs(fast - reference) <= tol * max(abs(reference), 1e-30)


def _channels(stat: Tensor, like: Tensor, lead: Sequence[int]) -> Tensor:
    """A per-channel statistic shaped to broadcast over ``like`` (channels after ``lead`` + B)."""
    extra = like.dim() - len(lead) - 2
    return stat.reshape(*([1] * (len(lead) + 1)), -1, *([1] * extra))


def _channels_last(t: Tensor, lead: Sequence[int]) -> Tensor:
    """``(…, B, C, *S) -> (…, B·S, C)``."""
    return t.movedim(len(lead) + 1, -1).reshape(*lead, -1, t.shape[len(lead) + 1])


def _channels_first(t: Tensor, shape: Sequence[int], m: int) -> Tensor:
    """The inverse of :func:`_channels_last`: ``(m, B·S, C) -> (m, *shape)``."""
    b, c, rest = shape[0], shape[1], list(shape[2:])
    return t.reshape(m, b, *rest, c).movedim(-1, 2).reshape(m, *shape)
