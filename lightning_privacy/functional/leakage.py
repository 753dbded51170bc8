"""Inversion Influence Function (I2F): how far a perfect attacker's reconstruction moves under δ.

Zhang, Hong, Deng, Mahdavi and Zhou, "A Theoretical Insight into Attack and Defense of Gradient
Leakage in Transformer / Understanding Deep Gradient Leakage via Inversion Influence Functions",
NeurIPS 2023 (arXiv 2309.13016). With ``J = ∇_x ∇_θ L(x, θ)`` (input dim x parameter dim) and a
perturbation ``δ`` of the shared gradient (noise, the pruning residual, ...)::

    I2F(δ)    = ‖(J Jᵀ + λ I)⁻¹ J δ‖          (λ = damping; the paper's definition has λ = 0)
    I2F_lb(δ) = ‖J δ‖ / λ_max(J Jᵀ)           (a lower bound, Eq. 5 of the paper)
    E I2F²    = σ² tr((J Jᵀ)⁻¹)                for δ ~ N(0, σ² I)

``J δ`` and ``Jᵀ v`` are vector-Jacobian products of the parameter gradient (double
backpropagation with :mod:`torch.func`), batched with ``vmap``; ``J`` is not formed for them.
The exact I2F needs the *bottom* of the spectrum of ``J Jᵀ`` (``λ_min / λ_max`` is ~1e-6 on the
DLG LeNet), where Krylov methods need about ``d_x`` iterations per right-hand side. So, when the
input is small enough (``d_x <= dense_limit``), the input-space Gram matrix ``J Jᵀ``
(``d_x x d_x``, small) is assembled once from ``d_x`` batched products and factorised once, and
every δ draw, the Gaussian expectation and the lower bound reuse that factorisation (for small
models the rows of ``J`` are held transiently while the Gram matrix is formed; see
:meth:`LeakageOperator.gram`). Above the limit, conjugate gradients (matrix-free) solve each δ,
Hutchinson probes estimate the traces and Lanczos gives ``λ_max``. Both paths answer the same
:class:`GramSolver` questions (solves, ``tr((J Jᵀ)⁻¹)``, ``tr(J Jᵀ)``, ``λ_max``);
:func:`gram_solver` picks one per example.

Honest use: the lower bound tracks the *size* of δ, not which images leak; at a fixed noise scale
it ranks images no better than ``‖δ‖`` alone, and it sits orders of magnitude below the exact value
on the DLG LeNet. Damping likewise destroys the ranking once ``λ >~ 1e-4 λ_max`` (the official
code's damped gradient descent uses ``λ ≈ 3e-3 λ_max``). The undamped exact I2F is the estimate.

Example:
    >>> import torch
    >>> torch.manual_seed(0) is not None
    True
    >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> x, y = torch.randn(1, 3), torch.tensor([1])
    >>> delta = [1e-3 * torch.randn_like(p) for p in model.parameters()]
    >>> exact = i2f(model, x, y, delta).value
    >>> bound = i2f_lower_bound(model, x, y, delta).value
    >>> bool(bound <= exact)
    True
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from lightning_privacy._validation import check_choice, check_float, check_int
from lightning_privacy.functional.gradients import LossFn, select_parameters
from lightning_privacy.functional.leakage_products import (
    PREFIX_RATIO,
    GramProducts,
    MeasurementTimeoutError,
)
from lightning_privacy.functional.leakage_stem import (
    RidgedCholesky,
    StemGram,
    StemPreconditioner,
)
from lightning_privacy.functional.precision import full_precision

Delta = Tensor | Sequence[Tensor] | Mapping[str, Tensor]

#: Draws of δ per ``vmap`` call of the forward-mode ``J δ`` (:meth:`LeakageOperator.jvp`).
ALONG_CHUNK = 32

#: The ``method`` names of :func:`gram_solver`.
METHODS = ("auto", "dense", "pcg", "cg")
#: Preconditioners of :class:`PreconditionedGramSolver`: the first layer's Gram matrix in closed
#: form (``"stem"``), the first layers' from column passes (``"prefix"``), or ``"auto"``.
PRECONDITIONERS = ("auto", "stem", "prefix")

__all__ = [
    "METHODS",
    "BlockCGResult",
    "CGResult",
    "DenseGramSolver",
    "GramFactorization",
    "GramPreconditioner",
    "GramProducts",
    "GramSolution",
    "GramSolver",
    "I2FResult",
    "LanczosIteration",
    "LanczosResult",
    "LeakageOperator",
    "LowerBoundResult",
    "MatrixFreeGramSolver",
    "MeasurementTimeoutError",
    "PreconditionedGramSolver",
    "block_conjugate_gradient",
    "chosen_stem",
    "conjugate_gradient",
    "expected_gaussian_i2f",
    "gram_of_rows",
    "gram_solver",
    "hutchinson_trace_inverse",
    "i2f",
    "i2f_from_operator",
    "i2f_lower_bound",
    "lanczos_lambda_max",
    "preconditioned_conjugate_gradient",
    "predicted_psnr",
]


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite, by one min/max reduction (NaN propagates through both).

    ``torch.isfinite(t).all()`` writes a boolean copy first: 113 ms for four ResNet-18-sized
    draws of δ against 3.5 ms here.

    Example:
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _check_differentiable_inputs(inputs: Any) -> None:
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        dtype = inputs.dtype if isinstance(inputs, Tensor) else type(inputs).__name__
        raise TypeError(
            "Expected `inputs` to be a floating-point tensor the loss is differentiable in, "
            f"but got {dtype}. I2F differentiates the parameter gradient w.r.t. the inputs; "
            "integer token ids have no gradient: pass the embeddings instead (compute "
            "`embeddings = model.embed(tokens)` and estimate on a model that starts after "
            "the embedding layer)."
        )


class LeakageOperator:
    """Matrix-free ``J = ∇_x ∇_θ L`` of one batch: ``J δ``, ``Jᵀ v`` and ``J Jᵀ``.

    The graphs of the two parameter/input gradients are built once; every product after that is
    one backward pass through them (``vmap``-batched for many vectors). The model is read through
    ``torch.func.functional_call`` on detached parameters and cloned buffers: no ``.grad``, no
    BatchNorm statistics, no optimizer state is touched.

    Args:
        model: The network.
        inputs: A floating-point batch (the attacker reconstructs these values).
        targets: Labels (second argument of ``loss_fn``), assumed known to the attacker.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; use the reduction of the gradient that is
            actually shared (mean cross-entropy by default).
        layers: Parameters whose gradient the attacker observes (regex or list, as
            ``GradientDefense(layers=)``); ``None`` for all trainable parameters.
        chunk_size: Vectors per ``vmap`` call when many products are needed at once; default:
            as many as fit in about 64 MB of parameter-sized vectors (at most 256).

    Raises:
        TypeError: If ``inputs`` is not floating point (integer token ids have no gradient).
        ValueError: If the loss has no differentiable path from the inputs to the parameters.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> op = LeakageOperator(model, torch.randn(1, 4), torch.tensor([0]))
        >>> op.input_dim, op.param_dim
        (4, 10)
        >>> op.jvp([torch.ones(2, 4), torch.ones(2)]).shape
        torch.Size([1, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        *,
        loss_fn: LossFn = F.cross_entropy,
        layers: str | Sequence[str] | None = None,
        chunk_size: int | None = None,
    ) -> None:
        _check_differentiable_inputs(inputs)
        selected = select_parameters(model, layers)
        if not selected:
            raise ValueError("Expected the model to have trainable parameters, but it has none.")
        if chunk_size is None:  # about 64 MB of parameter-sized vectors per vmap call
            chunk_size = max(
                1, min(256, 2**24 // max(1, sum(p.numel() for p in selected.values())))
            )
        self.chunk_size = check_int("chunk_size", chunk_size, low=1)
        self.names = list(selected)
        self.shapes = [tuple(p.shape) for p in selected.values()]
        self.numels = [p.numel() for p in selected.values()]
        self.input_shape = tuple(inputs.shape)
        self.input_dim = inputs.numel()
        self.param_dim = sum(self.numels)
        self.dtype = inputs.dtype
        self._build_products(model, inputs, targets, loss_fn, selected)
        self._check_differentiable_path()
        self._source = (model, inputs.detach(), targets, loss_fn)
        self._products: GramProducts | bool | None = False  # False: not built yet

    def _build_products(
        self,
        model: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn,
        selected: Mapping[str, Tensor],
    ) -> None:
        """Build the two gradient graphs once: ``J δ``, ``Jᵀ v`` and the gradient ``g``."""
        params = {n: p.detach() for n, p in selected.items()}
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in selected}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        x0 = inputs.detach()

        def loss_at(p: dict[str, Tensor], x: Tensor) -> Tensor:
            outputs = functional_call(model, {**buffers, **fixed, **p}, (x,))
            return loss_fn(outputs, targets)

        def flat_param_grad(x: Tensor) -> Tensor:
            g = grad(loss_at)(params, x)
            return torch.cat([g[n].reshape(-1) for n in self.names])

        def input_grad(p: dict[str, Tensor]) -> Tensor:
            return grad(loss_at, argnums=1)(p, x0).reshape(-1)

        def input_grad_along(delta: Tensor) -> Tensor:  # ∇ₓ ⟨∇_θ L, δ⟩ = J δ, forward-mode inside
            parts = torch.split(delta, self.numels)
            tangent = {
                n: t.reshape(s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)
            }
            return grad(lambda x: jvp(lambda p: loss_at(p, x), (params,), (tangent,))[1])(x0)

        with torch.enable_grad():
            forward = vjp(flat_param_grad, x0)  # δ (d_θ) -> J δ (input shape)
            backward = vjp(input_grad, params)  # v (d_x) -> Jᵀ v (dict)
        self._j, self._jt = forward[1], backward[1]
        self._j_along: Callable[[Tensor], Tensor] | None = input_grad_along
        self.gradient = forward[0].detach()

    def _check_differentiable_path(self) -> None:
        """Refuse a non-finite gradient (naming NaN) and a zero ``∇ₓ∇_θ L`` (naming its causes)."""
        if not all_finite(self.gradient):
            raise FloatingPointError(
                "Expected a finite loss and parameter gradient at this example, but they hold "
                "NaN or inf (a diverged model, a non-finite input, or a loss that overflowed); "
                "the I2F is undefined there. Check the model's weights and the held-out batch."
            )
        probe = torch.randn(
            self.input_dim, generator=torch.Generator().manual_seed(0), dtype=self.dtype
        )
        product = self.jt(probe.to(self.gradient.device))
        if not all_finite(product):
            raise FloatingPointError(
                "Expected finite second derivatives ∇ₓ∇_θ L at this example, but they hold NaN "
                "or inf (the gradient is finite, but its derivative overflowed or divides by "
                "zero, e.g. a norm of a zero vector); the I2F is undefined there."
            )
        if not bool(product.abs().sum() > 0):
            raise ValueError(
                "Expected a differentiable path from the inputs to the parameter gradient, but "
                "∇_x ∇_θ L is zero (the inputs are detached, discretised, or used only through an "
                "index lookup). Estimate leakage on continuous inputs, e.g. token embeddings."
            )

    def flatten_delta(self, delta: Delta) -> Tensor:
        """Validate δ and return it as a ``(k, d_θ)`` tensor (``k`` draws).

        Accepts a sequence of tensors shaped like the observed parameters, a ``{name: tensor}``
        mapping, a flat ``(d_θ,)`` tensor or a ``(k, d_θ)`` batch of draws.

        Raises:
            ValueError: On wrong shapes, wrong count, or non-finite values.
        """
        expected = ", ".join(f"{n}{list(s)}" for n, s in zip(self.names, self.shapes, strict=True))
        if isinstance(delta, Mapping):
            missing = [n for n in self.names if n not in delta]
            if missing:
                raise ValueError(
                    f"Expected `delta` to hold every observed parameter, but {missing} are "
                    f"missing. Expected: {expected}."
                )
            delta = [delta[n] for n in self.names]
        if isinstance(delta, Tensor):
            flat = delta.reshape(1, -1) if delta.dim() == 1 else delta
            if flat.dim() != 2 or flat.shape[1] != self.param_dim:
                raise ValueError(
                    f"Expected `delta` as a flat tensor of {self.param_dim} entries (or a "
                    f"(k, {self.param_dim}) batch), but got shape {list(delta.shape)}."
                )
        else:
            parts = list(delta)
            got = [list(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in parts]
            if len(parts) != len(self.shapes) or any(
                not isinstance(t, Tensor) or tuple(t.shape) != s
                for t, s in zip(parts, self.shapes, strict=False)
            ):
                raise ValueError(
                    f"Expected `delta` to have one tensor per observed parameter with shapes "
                    f"{expected}, but got {len(parts)} tensors with shapes {got}."
                )
            flat = torch.cat([t.reshape(-1) for t in parts]).reshape(1, -1)
        if not all_finite(flat):
            raise ValueError(
                "Expected `delta` to be finite, but it holds NaN or inf entries (a defense that "
                "overflowed, or a diverged gradient)."
            )
        return flat.to(dtype=self.dtype)

    def jvp(self, delta: Delta) -> Tensor:
        """``J δ`` in input shape (``(k, *input_shape)`` for a ``(k, d_θ)`` batch).

        Reverse over forward mode: the gradient in ``x`` of the loss's derivative along δ, all
        draws in one ``vmap``: 0.14 s for 4 draws on torchvision ResNet-18, against about 0.3 s
        for the reverse-over-reverse product through the cached gradient graph (one draw per
        call there), which stays the path for a model with an operation that has no
        forward-mode rule.
        """
        flat = self.flatten_delta(delta)
        rows = self._along_rows(flat)
        if isinstance(delta, Tensor) and delta.dim() == 2:
            return rows.reshape(-1, *self.input_shape)
        return rows[0]

    def _along_rows(self, flat: Tensor) -> Tensor:
        """``J δ`` per row; the forward-mode path in chunks of :data:`ALONG_CHUNK` draws.

        Its draws are parameter-sized inputs that already exist, and what it adds per draw is
        activation-sized, so it needs no :attr:`chunk_size` (which bounds the reverse path's
        parameter-sized outputs, one draw at a time on ResNet-18).
        """
        if self._j_along is not None:
            along = self._j_along
            try:
                return torch.cat(
                    [
                        vmap(along)(flat[i : i + ALONG_CHUNK])
                        for i in range(0, len(flat), ALONG_CHUNK)
                    ]
                )
            except (RuntimeError, NotImplementedError):  # no forward-mode rule for some op
                self._j_along = None
        return self._batched(lambda v: self._j(v)[0], flat)

    def jdelta_rows(self, delta: Delta) -> Tensor:
        """``J δ`` as float64 rows ``(k, d_x)``, one per draw (``k = 1`` for a single δ).

        Example:
            >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([1]))
            >>> op.jdelta_rows(torch.zeros(4, op.param_dim)).shape
            torch.Size([4, 3])
        """
        batched = isinstance(delta, Tensor) and delta.dim() == 2
        return self.jvp(delta).reshape(-1 if batched else 1, self.input_dim).to(torch.float64)

    def jt(self, v: Tensor) -> Tensor:
        """``Jᵀ v`` as a flat ``(d_θ,)`` tensor for ``v`` of ``d_x`` entries."""
        out = self._jt(v.reshape(-1).to(self.dtype))[0]
        return torch.cat([out[n].reshape(-1) for n in self.names])

    def gram_matvec(self, v: Tensor) -> Tensor:
        """``J Jᵀ v`` (flat, ``d_x`` entries)."""
        return self._j(self.jt(v))[0].reshape(-1)

    def _batched(self, fn: Callable[[Tensor], Tensor], rows: Tensor) -> Tensor:
        outs = [
            vmap(fn)(rows[i : i + self.chunk_size]) for i in range(0, len(rows), self.chunk_size)
        ]
        return torch.cat(outs)

    def jacobian_rows(self, *, chunk_size: int | None = None) -> Tensor:
        """The dense ``J`` as a ``(d_x, d_θ)`` tensor: row ``i`` is ``Jᵀ e_i = ∂g / ∂x_i``.

        ``d_x`` batched reverse-over-reverse products (``vmap`` over the unit cotangents), written
        chunk by chunk into one contiguous matrix. Needs ``d_x * d_θ`` values of memory.

        Args:
            chunk_size: Rows per ``vmap`` call; default :attr:`chunk_size` (larger chunks were
                not faster on the DLG LeNet).

        Example:
            >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([1]))
            >>> op.jacobian_rows().shape
            torch.Size([3, 8])
        """
        c = check_int("chunk_size", self.chunk_size if chunk_size is None else chunk_size, low=1)
        device = self.gradient.device
        eye = torch.eye(self.input_dim, dtype=self.dtype, device=device)
        rows = torch.empty(self.input_dim, self.param_dim, dtype=self.dtype, device=device)
        offsets = [0]
        for k in self.numels:
            offsets.append(offsets[-1] + k)
        for i in range(0, self.input_dim, c):
            out = vmap(self._jt)(eye[i : i + c])[0]
            for n, shape, a, b in zip(self.names, self.shapes, offsets, offsets[1:], strict=False):
                block = out[n]  # copied once, straight from its (possibly strided) layout
                rows[i : i + len(block), a:b].view(len(block), *shape).copy_(block)
        return rows

    def batched_products(self) -> GramProducts | None:
        """The engine of batched ``J Jᵀ V`` products (:mod:`.leakage_products`), or ``None``.

        Built on first use and checked once against :meth:`jt` on a random direction; ``None``
        (with a warning) when its layer rules do not reproduce the reference product, e.g. a layer
        whose weights are also used outside its ``forward``.

        Example:
            >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([1]))
            >>> op.batched_products().fallback
            []
        """
        if self._products is False:
            model, inputs, targets, loss_fn = self._source
            with torch.enable_grad():
                products = GramProducts(
                    model, inputs, targets, loss_fn=loss_fn, observed=self.names
                )
                ok = products.agrees_with(self.jt)
            if not ok:
                warnings.warn(
                    "The batched J Jᵀ products do not match the reference product on this model "
                    "(a layer's weights used outside its forward?); using the slower per-column "
                    "products.",
                    stacklevel=2,
                )
            self._products = products if ok else None
        return self._products if isinstance(self._products, GramProducts) else None

    def gram_matmul(self, rows: Tensor) -> Tensor:
        """``J Jᵀ v`` for every row ``v`` of a ``(k, d_x)`` tensor (batched when possible).

        Example:
            >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([1]))
            >>> torch.allclose(op.gram_matmul(torch.eye(3)).double(), op.gram(), atol=1e-6)
            True
        """
        rows = rows.reshape(-1, self.input_dim)
        products = self.batched_products()
        if products is not None:
            return products.matmul(rows)
        return torch.stack([self.gram_matvec(v) for v in rows])

    def gram(
        self,
        *,
        row_budget: int = 2**28,
        deadline: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """The dense ``d_x x d_x`` input-space Gram matrix ``J Jᵀ`` in float64 (symmetric).

        When the rows of ``J`` fit in ``row_budget`` bytes (37 MB for the DLG LeNet on 32x32
        images) they are formed once (:meth:`jacobian_rows`) and ``J Jᵀ`` is one symmetric
        rank-``d_θ`` update: BLAS ``syrk`` on CPU, blocked products over one triangle elsewhere.
        Above the budget the columns ``J Jᵀ e_i`` come from :meth:`batched_products` (many
        columns per pass through the network), or, where its rules do not apply, one by one.

        Args:
            row_budget: Bytes the rows of ``J`` may take; ``0`` forces the column products.
            deadline: A ``time.perf_counter()`` value past which no further batch of columns
                starts (:class:`MeasurementTimeoutError` is raised instead).
            progress: Called with ``(columns done, d_x)`` while the columns are formed.

        Example:
            >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([1]))
            >>> g = op.gram()
            >>> g.shape, g.dtype, bool((g == g.T).all())
            (torch.Size([3, 3]), torch.float64, True)
        """
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        if self.input_dim * self.param_dim * itemsize <= row_budget:
            return gram_of_rows(self.jacobian_rows())
        products = self.batched_products()
        if products is not None:
            return products.gram(deadline=deadline, progress=progress)
        g = torch.empty(self.input_dim, self.input_dim, dtype=torch.float64)
        eye = torch.eye(self.input_dim, dtype=self.dtype, device=self.gradient.device)
        for i in range(self.input_dim):
            if deadline is not None and time.perf_counter() > deadline:
                done = f"{i} of {self.input_dim}"
                raise MeasurementTimeoutError(f"stopped after {done} columns of J Jᵀ")
            g[i] = self.gram_matvec(eye[i]).to(torch.float64).cpu()
            if progress is not None:
                progress(i + 1, self.input_dim)
        g = g.to(self.gradient.device)
        return (g + g.T) / 2


@functools.cache
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return None
    return ThreadpoolController()


def gram_of_rows(rows: Tensor, *, use_blas: bool = True, block: int = 128) -> Tensor:
    """``rows @ rows.T`` in float64, computing one triangle only.

    On CPU (float32/float64) this is one BLAS ``syrk`` call through SciPy, limited to
    ``torch.get_num_threads()`` BLAS threads; otherwise (or with ``use_blas=False``) blocked
    ``torch`` products below the diagonal, ``block`` rows at a time. The products run in the
    dtype of ``rows``; the result is promoted to float64 and mirrored.

    Args:
        rows: A ``(n, m)`` matrix.
        use_blas: Use SciPy's ``syrk`` when possible.
        block: Rows per block of the ``torch`` fallback.

    Example:
        >>> a = torch.arange(6.0).reshape(2, 3)
        >>> gram_of_rows(a)
        tensor([[ 5., 14.],
                [14., 50.]], dtype=torch.float64)
        >>> bool((gram_of_rows(a, use_blas=False) == gram_of_rows(a)).all())
        True
    """
    check_int("block", block, low=1)
    rows = rows.detach()
    n = rows.shape[0]
    if use_blas and rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64):
        from scipy.linalg import blas

        syrk = blas.ssyrk if rows.dtype == torch.float32 else blas.dsyrk
        a = rows.contiguous().numpy()
        controller = _blas_controller()
        if controller is None:  # pragma: no cover
            upper = syrk(1.0, a.T, trans=1, lower=0)
        else:
            with controller.limit(limits=torch.get_num_threads(), user_api="blas"):
                upper = syrk(1.0, a.T, trans=1, lower=0)  # (aᵀ)ᵀ aᵀ = a aᵀ, no copy of a
        g = torch.from_numpy(upper).to(torch.float64)
        upper_mask = torch.ones(n, n, dtype=torch.bool).triu()
        return torch.where(upper_mask, g, g.T)
    g = torch.zeros(n, n, dtype=torch.float64, device=rows.device)
    for i in range(0, n, block):
        g[i:, i : i + block] = (rows[i:] @ rows[i : i + block].T).to(torch.float64)
    lower_mask = torch.ones(n, n, dtype=torch.bool, device=rows.device).tril()
    return torch.where(lower_mask, g, g.T)


@dataclass(frozen=True)
class LanczosResult:
    """Largest eigenvalue of a symmetric operator by Lanczos iteration.

    Attributes:
        value: The largest Ritz value.
        iterations: Lanczos steps taken (one operator product each).
        converged: Whether the Ritz residual fell below ``tol * value``.
        residual: The final Ritz residual ``‖A q - θ q‖``.

    Example:
        >>> lanczos_lambda_max(lambda v: 3 * v, 4).value
        3.0
    """

    value: float
    iterations: int
    converged: bool
    residual: float


def lanczos_lambda_max(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    *,
    max_iterations: int = 64,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> LanczosResult:
    """``λ_max`` of a symmetric positive semi-definite operator (Lanczos, full reorthogonalisation).

    Args:
        matvec: ``v -> A v`` on flat vectors of ``dim`` entries.
        dim: Operator size.
        max_iterations: See :class:`LanczosIteration`, which runs the steps.
        tol: See :class:`LanczosIteration`.
        generator: See :class:`LanczosIteration`.
        dtype: See :class:`LanczosIteration`.
        device: See :class:`LanczosIteration`.

    Example:
        >>> a = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> r = lanczos_lambda_max(lambda v: a @ v, 100)
        >>> round(r.value, 6), r.converged
        (100.0, True)
    """
    iteration = LanczosIteration(
        dim,
        max_iterations=max_iterations,
        tol=tol,
        generator=generator,
        dtype=dtype,
        device=device,
    )
    while not iteration.done:
        iteration.step(matvec(iteration.vector.to(dtype)))
    return iteration.result()


class LanczosIteration:
    """Lanczos for ``λ_max`` one product at a time, so its products can ride in other batches.

    :func:`lanczos_lambda_max` runs it alone; the preconditioned solver appends :attr:`vector`
    to its conjugate-gradient batch, so ``λ_max`` costs one more row per batched product instead
    of a pass of its own per step.

    Args:
        dim: Operator size.
        max_iterations: Maximum Lanczos steps (capped at ``dim``).
        tol: Relative Ritz-residual tolerance for convergence.
        generator: Generator of the random start vector.
        dtype: Working precision of the Lanczos vectors.
        device: Device of the vectors.

    Example:
        >>> a = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> it = LanczosIteration(10, tol=1e-9)
        >>> while not it.done:
        ...     it.step(a @ it.vector)
        >>> round(it.result().value, 6)
        10.0
    """

    def __init__(
        self,
        dim: int,
        *,
        max_iterations: int = 64,
        tol: float = 1e-6,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        check_int("max_iterations", max_iterations, low=1)
        self.tol = check_float("tol", tol, low=0.0, low_open=True)
        self.steps, self.dtype = min(max_iterations, dim), dtype
        q = torch.randn(dim, generator=generator, dtype=dtype, device=device)
        self.basis = [q / q.norm()]
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.value, self.residual, self.converged = 0.0, math.inf, False

    @property
    def vector(self) -> Tensor:
        """The vector whose product :meth:`step` expects next."""
        return self.basis[-1]

    @property
    def done(self) -> bool:
        """Converged, or out of steps."""
        return self.converged or len(self.alphas) >= self.steps

    def step(self, product: Tensor) -> None:
        """Take ``A q`` for ``q = vector``: one Lanczos step (full reorthogonalisation)."""
        w = product.to(self.dtype)
        self.alphas.append(float(w @ self.basis[-1]))
        q_mat = torch.stack(self.basis, 1)
        w = w - q_mat @ (q_mat.T @ w)
        w = w - q_mat @ (q_mat.T @ w)  # twice is enough (Kahan)
        beta = float(w.norm())
        t = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if self.betas:
            off = torch.tensor(self.betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        self.value = float(evals[-1])
        self.residual = abs(beta * float(evecs[-1, -1]))
        if self.residual <= self.tol * max(abs(self.value), 1e-300) or beta <= 1e-300:
            self.converged = True
            return
        self.betas.append(beta)
        self.basis.append(w / beta)

    def result(self) -> LanczosResult:
        """The largest Ritz value so far, with the steps taken and convergence."""
        return LanczosResult(self.value, len(self.alphas), self.converged, self.residual)


@dataclass(frozen=True)
class CGResult:
    """Solution of ``(A + λ I) x = b`` by conjugate gradients.

    Attributes:
        solution: ``x`` (flat).
        iterations: Iterations taken.
        converged: Whether ``‖r‖ <= tol ‖b‖``.
        relative_residual: Final ``‖r‖ / ‖b‖``.

    Example:
        >>> conjugate_gradient(lambda v: 2 * v, torch.ones(3, dtype=torch.float64)).solution
        tensor([0.5000, 0.5000, 0.5000], dtype=torch.float64)
    """

    solution: Tensor
    iterations: int
    converged: bool
    relative_residual: float


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iterations: int | None = None,
) -> CGResult:
    """Solve ``(A + damping I) x = b`` for symmetric positive (semi-)definite ``A``, from ``x = 0``.

    Args:
        matvec: ``v -> A v`` on flat vectors.
        b: Right-hand side (flat).
        damping: ``λ >= 0`` added to the diagonal.
        tol: Relative residual tolerance.
        max_iterations: Iteration cap (default ``4 * len(b)``).

    Example:
        >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> r = conjugate_gradient(lambda v: a @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> torch.allclose(a @ r.solution, torch.tensor([1.0, 2.0], dtype=torch.float64))
        True
    """
    damping = check_float("damping", damping, low=0.0)
    cap = (
        4 * b.numel()
        if max_iterations is None
        else check_int("max_iterations", max_iterations, low=1)
    )
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = float(r @ r)
    b_norm = math.sqrt(float(b @ b))
    if b_norm == 0.0:
        return CGResult(x, 0, True, 0.0)
    k = 0
    for k in range(1, cap + 1):  # noqa: B007
        ap = matvec(p) + damping * p
        alpha = rr / float(p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = float(r @ r)
        if math.sqrt(rr_new) <= tol * b_norm:
            rr = rr_new
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    rel = math.sqrt(rr) / b_norm
    return CGResult(x, k, rel <= tol, rel)


class GramFactorization:
    """One factorisation of ``J Jᵀ`` reused for every δ, damping-free expectation and ``λ_max``.

    Args:
        gram: Dense symmetric ``J Jᵀ`` (float64).
        spectrum: ``True`` for a full eigendecomposition (needed for damping sweeps and
            eigenvector directions); ``False`` for a Cholesky factor (faster), falling back to the
            eigendecomposition when ``J Jᵀ`` is singular.
        rcond: Eigenvalues below ``rcond * λ_max`` count as zero (pseudo-inverse, with a warning).

    Example:
        >>> f = GramFactorization(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)))
        >>> f.solve(torch.tensor([4.0, 1.0], dtype=torch.float64))
        tensor([1., 1.], dtype=torch.float64)
        >>> f.trace_inverse()
        1.25
    """

    def __init__(self, gram: Tensor, *, spectrum: bool = False, rcond: float = 1e-13) -> None:
        self.gram = gram.to(torch.float64)
        self.dim = gram.shape[0]
        self.rcond = rcond
        self.eigenvalues: Tensor | None = None
        self.eigenvectors: Tensor | None = None
        self._cholesky: Tensor | None = None
        self.singular = False
        if not spectrum:
            factor, info = torch.linalg.cholesky_ex(self.gram)
            if int(info) == 0 and bool(torch.isfinite(factor).all()):
                self._cholesky = factor
                return
        self._eigen()

    def _eigen(self) -> None:
        if self.eigenvalues is not None:
            return
        evals, evecs = torch.linalg.eigh(self.gram)
        top = float(evals[-1].clamp_min(0.0))
        floor = self.rcond * top
        self.singular = bool(evals[0] <= floor)
        if self.singular:
            rank = int((evals > floor).sum())
            warnings.warn(
                f"J Jᵀ is singular (rank {rank} < input dimension {self.dim}): the inputs are "
                "not identifiable from the gradient (more input values than independent "
                "gradient directions, e.g. a batch too large for the model). The undamped I2F "
                "is infinite; using the pseudo-inverse on the identifiable subspace.",
                stacklevel=3,
            )
        self.eigenvalues, self.eigenvectors = evals, evecs

    @property
    def lambda_max(self) -> float:
        """Largest eigenvalue (from the eigendecomposition, or Lanczos on the dense Gram)."""
        if self.eigenvalues is not None:
            return float(self.eigenvalues[-1])
        return self.lanczos().value

    def lanczos(
        self, *, tol: float = 1e-8, generator: torch.Generator | None = None
    ) -> LanczosResult:
        """``λ_max`` of the Gram matrix by Lanczos (cheap: dense ``d_x x d_x`` products)."""
        if generator is None:
            generator = torch.Generator(device=self.gram.device).manual_seed(0)
        return lanczos_lambda_max(
            lambda v: self.gram @ v, self.dim, tol=tol, generator=generator, device=self.gram.device
        )

    def _inverse_weights(self, damping: float) -> Tensor:
        assert self.eigenvalues is not None
        lam = self.eigenvalues
        if damping > 0:
            return 1.0 / (lam.clamp_min(0.0) + damping)
        keep = lam > self.rcond * float(lam[-1].clamp_min(0.0))
        inv = torch.zeros_like(lam)
        inv[keep] = 1.0 / lam[keep]
        return inv

    def solve(self, b: Tensor, damping: float = 0.0) -> Tensor:
        """``(J Jᵀ + damping I)⁻¹ b`` for flat ``b`` or a ``(k, d_x)`` batch of rows."""
        rows = b.to(torch.float64).reshape(-1, self.dim)
        if damping == 0.0 and self._cholesky is not None:
            out = torch.cholesky_solve(rows.T, self._cholesky).T
        else:
            self._eigen()
            assert self.eigenvectors is not None
            u = self.eigenvectors
            out = ((rows @ u) * self._inverse_weights(damping)) @ u.T
        return out.reshape(b.shape)

    def trace_inverse(self, damping: float = 0.0) -> float:
        """``E ‖(J Jᵀ + λ I)⁻¹ J z‖²`` for ``z ~ N(0, I)``: ``Σ λ_i / (λ_i + λ)²``.

        Undamped this is ``tr((J Jᵀ)⁻¹)``.
        """
        if damping == 0.0 and self._cholesky is not None:
            eye = torch.eye(self.dim, dtype=torch.float64, device=self.gram.device)
            inv_l = torch.linalg.solve_triangular(self._cholesky, eye, upper=False)
            return float((inv_l**2).sum())
        self._eigen()
        assert self.eigenvalues is not None
        lam = self.eigenvalues.clamp_min(0.0)
        inv = self._inverse_weights(damping)
        return float((lam * inv**2).sum())


@dataclass(frozen=True)
class GramSolution:
    """Solutions of ``(J Jᵀ + λ I) x = b`` for ``k`` right-hand sides.

    Attributes:
        solution: ``(k, d_x)`` float64, one solution per row of ``b``.
        iterations: CG iterations per row (empty for a dense solve).
        converged: Whether every CG solve reached its tolerance (``True`` for a dense solve).

    Example:
        >>> GramSolution(torch.zeros(1, 3)).converged
        True
    """

    solution: Tensor
    iterations: tuple[int, ...] = ()
    converged: bool = True


class GramSolver(ABC):
    """``J Jᵀ + λ I`` of one example, behind one interface whether it is assembled or not.

    An estimator is written once against the four quantities it needs; :func:`gram_solver` picks
    :class:`DenseGramSolver` (assemble and factorise ``J Jᵀ``) or :class:`MatrixFreeGramSolver`
    (conjugate gradients, Hutchinson probes and Lanczos on ``v -> J Jᵀ v``) per example.

    Attributes:
        method: ``"dense"`` or ``"cg"``.
        damping: ``λ >= 0``.

    Example:
        >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([1]))
        >>> solver = gram_solver(op, method="dense")
        >>> isinstance(solver, GramSolver), solver.method
        (True, 'dense')
    """

    method: ClassVar[str]
    damping: float

    @abstractmethod
    def solve(self, rows: Tensor) -> GramSolution:
        """``(J Jᵀ + λ I)⁻¹ b`` for every row ``b`` of a ``(k, d_x)`` tensor."""

    def solve_norms(self, rows: Tensor) -> Tensor:
        """``‖(J Jᵀ + λ I)⁻¹ b‖`` per row: the I2F of the draws whose ``J δ`` the rows hold.

        Example:
            >>> f = GramFactorization(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)))
            >>> DenseGramSolver(f).solve_norms(torch.tensor([[4.0, 0.0], [0.0, 2.0]]))
            tensor([1., 2.], dtype=torch.float64)
        """
        return self.solve(rows).solution.norm(dim=-1)

    @abstractmethod
    def trace_inverse(self) -> float:
        """``Σ λ_i / (λ_i + λ)²`` (``tr((J Jᵀ)⁻¹)`` undamped): ``E I2F²`` of unit Gaussian δ."""

    @abstractmethod
    def trace(self) -> float:
        """``tr(J Jᵀ) = ‖J‖_F² = E ‖J z‖²`` for ``z ~ N(0, I)``."""

    @abstractmethod
    def lanczos(self) -> LanczosResult:
        """``λ_max(J Jᵀ)`` by Lanczos, with its iterations and convergence."""

    def solve_with_lanczos(self, rows: Tensor) -> tuple[GramSolution, LanczosResult]:
        """:meth:`solve` and :meth:`lanczos` together (a solver may share their products).

        Example:
            >>> f = GramFactorization(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)))
            >>> solution, top = DenseGramSolver(f).solve_with_lanczos(torch.tensor([[4.0, 1.0]]))
            >>> solution.solution, round(top.value, 6)
            (tensor([[1., 1.]], dtype=torch.float64), 4.0)
        """
        return self.solve(rows), self.lanczos()


@dataclass(frozen=True)
class DenseGramSolver(GramSolver):
    """Every quantity from one factorisation of the assembled ``J Jᵀ`` (exact and cheap per δ).

    Args:
        factorization: The factorised ``J Jᵀ`` (see :meth:`assemble`).
        damping: ``λ >= 0``.
        lanczos_seed: Seed of the Lanczos start vector.

    Example:
        >>> f = GramFactorization(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)))
        >>> solver = DenseGramSolver(f)
        >>> solver.trace_inverse(), solver.trace(), round(solver.lanczos().value, 6)
        (1.25, 5.0, 4.0)
    """

    method: ClassVar[str] = "dense"
    factorization: GramFactorization
    damping: float = 0.0
    lanczos_seed: int = 0

    @classmethod
    def assemble(
        cls,
        op: LeakageOperator,
        *,
        damping: float = 0.0,
        lanczos_seed: int = 0,
        deadline: float | None = None,
    ) -> DenseGramSolver:
        """Assemble ``J Jᵀ`` of ``op`` (``d_x`` batched products) and factorise it once.

        Damped, the eigendecomposition is taken at once (the Cholesky factor would go unused).
        Past ``deadline`` (a ``time.perf_counter()`` value) the assembly stops with
        :class:`MeasurementTimeoutError`.

        Example:
            >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([1]))
            >>> DenseGramSolver.assemble(op).factorization.dim
            3
        """
        gram = op.gram(deadline=deadline)
        return cls(GramFactorization(gram, spectrum=damping > 0), damping, lanczos_seed)

    def solve(self, rows: Tensor) -> GramSolution:
        """Solve every row with the factorisation."""
        return GramSolution(self.factorization.solve(rows, self.damping))

    def trace_inverse(self) -> float:
        """Exact, from the factorisation."""
        return self.factorization.trace_inverse(self.damping)

    def trace(self) -> float:
        """Exact: the diagonal of ``J Jᵀ``."""
        return float(torch.trace(self.factorization.gram))

    def lanczos(self) -> LanczosResult:
        """Lanczos on the dense matrix (``d_x x d_x`` products)."""
        gram = self.factorization.gram
        generator = torch.Generator(device=gram.device).manual_seed(self.lanczos_seed)
        return self.factorization.lanczos(generator=generator)


@dataclass(frozen=True)
class MatrixFreeGramSolver(GramSolver):
    """Every quantity from products ``v -> J Jᵀ v``, for inputs too large to assemble ``J Jᵀ``.

    Solves by conjugate gradients from zero, both traces by Hutchinson's estimator with
    ``num_probes`` Rademacher probes drawn from ``generator``, ``λ_max`` by Lanczos.

    Args:
        operator: The example's :class:`LeakageOperator`.
        damping: ``λ >= 0``.
        lanczos_seed: Seed of the Lanczos start vector.
        num_probes: Probes per trace estimate.
        generator: Source of the probes.
        tol: CG relative residual tolerance.
        max_iterations: CG iteration cap (default ``4 d_x``).

    Example:
        >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([1]))
        >>> dense, free = gram_solver(op, method="dense"), gram_solver(op, method="cg")
        >>> abs(free.lanczos().value / dense.lanczos().value - 1) < 1e-5
        True
    """

    method: ClassVar[str] = "cg"
    operator: LeakageOperator
    damping: float = 0.0
    lanczos_seed: int = 0
    num_probes: int = 16
    generator: torch.Generator | None = None
    tol: float = 1e-6
    max_iterations: int | None = None

    def _gram_matvec(self, v: Tensor) -> Tensor:
        return self.operator.gram_matvec(v).to(torch.float64)

    def solve(self, rows: Tensor) -> GramSolution:
        """Conjugate gradients per row; warns when one stops before ``tol``."""
        runs = [
            conjugate_gradient(
                self._gram_matvec,
                b,
                damping=self.damping,
                tol=self.tol,
                max_iterations=self.max_iterations,
            )
            for b in rows
        ]
        iterations = tuple(r.iterations for r in runs)
        converged = all(r.converged for r in runs)
        if not converged:
            warnings.warn(
                f"Conjugate gradients stopped before tol={self.tol} (iterations {iterations}); "
                "the I2F is approximate. Raise `max_iterations` or use method='dense'.",
                stacklevel=3,
            )
        return GramSolution(torch.stack([r.solution for r in runs]), iterations, converged)

    def trace_inverse(self) -> float:
        """Hutchinson's estimate (:func:`hutchinson_trace_inverse`)."""
        return hutchinson_trace_inverse(
            self.operator,
            num_probes=self.num_probes,
            damping=self.damping,
            tol=self.tol,
            max_iterations=self.max_iterations,
            generator=self.generator,
        )

    def trace(self) -> float:
        """Hutchinson's estimate: the mean of ``zᵀ J Jᵀ z`` over the probes."""
        probes = _rademacher_probes(self.num_probes, self.operator, self.generator)
        return sum(float(z @ self._gram_matvec(z)) for z in probes) / len(probes)

    def lanczos(self) -> LanczosResult:
        """Lanczos on ``v -> J Jᵀ v`` (never assembles ``J Jᵀ``)."""
        device = self.operator.gradient.device
        return lanczos_lambda_max(
            self._gram_matvec,
            self.operator.input_dim,
            generator=torch.Generator(device=device).manual_seed(self.lanczos_seed),
            device=device,
        )


@dataclass(frozen=True)
class BlockCGResult:
    """Solutions of ``(A + λ I) x = b`` for ``k`` right-hand sides by preconditioned CG.

    Attributes:
        solution: ``(k, n)`` float64 solutions.
        iterations: Iterations per right-hand side.
        converged: Whether every solve reached its tolerance.
        relative_residual: Final preconditioned relative residual per right-hand side.

    Example:
        >>> res = preconditioned_conjugate_gradient(lambda v: 2 * v, torch.ones(1, 3))
        >>> res.solution, res.iterations
        (tensor([[0.5000, 0.5000, 0.5000]], dtype=torch.float64), (1,))
    """

    solution: Tensor
    iterations: tuple[int, ...]
    converged: bool
    relative_residual: tuple[float, ...]


def preconditioned_conjugate_gradient(
    matmul: Callable[[Tensor], Tensor],
    rhs: Tensor,
    precondition: Callable[[Tensor], Tensor] | None = None,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iterations: int | None = None,
    deadline: float | None = None,
) -> BlockCGResult:
    """Independent preconditioned CG solves from zero, one batched product per iteration.

    Each right-hand side runs its own recurrence; the products of the unconverged ones are one
    call ``matmul((j, n)) -> (j, n)``, so a batched ``J Jᵀ`` product serves them all. A solve
    stops when its preconditioned residual ``sqrt(rᵀ M⁻¹ r / bᵀ M⁻¹ b)`` falls below ``tol``: with
    ``M ≈ A`` that is the relative error in the ``A``-norm, which bounds the error of the
    solution's norm far better than the plain residual on ill-conditioned ``A``.

    Args:
        matmul: ``(j, n) -> (j, n)`` rows ``v -> A v``.
        rhs: ``(k, n)`` right-hand sides.
        precondition: ``(j, n) -> (j, n)`` rows ``r -> M⁻¹ r`` (``None``: plain CG).
        damping: ``λ >= 0`` added to the diagonal of ``A``.
        tol: Preconditioned relative residual at which a solve stops.
        max_iterations: Iteration cap (default ``4 n``).
        deadline: ``time.perf_counter()`` value past which no further iteration starts
            (:class:`MeasurementTimeoutError`).

    Example:
        >>> a = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
        >>> res = preconditioned_conjugate_gradient(lambda v: v @ a, b, lambda r: r / 4)
        >>> torch.allclose(res.solution @ a, b), res.converged
        (True, True)
    """
    damping = check_float("damping", damping, low=0.0)
    b, cap, apply = _cg_setup(rhs, precondition, max_iterations)
    x, r = torch.zeros_like(b), b.clone()
    z = apply(r)
    p, rz = z.clone(), (r * z).sum(1)
    scale = rz.clamp_min(1e-300)
    done = rz <= 0
    iterations = torch.zeros(len(b), dtype=torch.long, device=b.device)
    for _ in range(cap):
        active = torch.nonzero(~done).flatten()
        if len(active) == 0:
            break
        if deadline is not None and time.perf_counter() > deadline:
            raise MeasurementTimeoutError(
                f"conjugate gradients stopped after {int(iterations.max())} iterations"
            )
        ap = matmul(p[active]).to(torch.float64) + damping * p[active]
        alpha = rz[active] / (p[active] * ap).sum(1)
        x[active] += alpha[:, None] * p[active]
        r[active] -= alpha[:, None] * ap
        z_new = apply(r[active])
        rz_new = (r[active] * z_new).sum(1)
        iterations[active] += 1
        p[active] = z_new + (rz_new / rz[active])[:, None] * p[active]
        rz[active] = rz_new
        done[active] = (rz_new.clamp_min(0) / scale[active]).sqrt() <= tol
    rel = (rz.clamp_min(0) / scale).sqrt()
    return BlockCGResult(
        x, tuple(int(i) for i in iterations), bool(done.all()), tuple(rel.tolist())
    )


def block_conjugate_gradient(
    matmul: Callable[[Tensor], Tensor],
    rhs: Tensor,
    precondition: Callable[[Tensor], Tensor] | None = None,
    *,
    augment: Tensor | None = None,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iterations: int | None = None,
    deadline: float | None = None,
) -> BlockCGResult:
    """Block preconditioned CG: all right-hand sides share one Krylov space.

    O'Leary's block CG (1980) with the block re-orthonormalised every iteration and its
    dependent directions dropped (the breakdown-free form of Ji and Li, 2017): each iteration
    multiplies one block of at most ``k + e`` rows, and the space grows by as many directions,
    so the smallest eigenvalues of ``M⁻¹ A`` (which dominate the norm of the solution and hold
    single solves back) are found ``k + e`` times faster. Where a batched product of many rows
    costs little more than of a few, as for ``J Jᵀ`` at batch 1, this trades cheap rows for
    expensive sequential passes. ``augment`` adds ``e`` right-hand sides whose solutions are not
    wanted (random vectors widen the space); the stopping rule reads the ``k`` wanted ones only:
    each preconditioned residual ``sqrt(rᵀ M⁻¹ r / bᵀ M⁻¹ b)`` at most ``tol``.

    Args:
        matmul: ``(j, n) -> (j, n)`` rows ``v -> A v``.
        rhs: ``(k, n)`` right-hand sides.
        precondition: ``(j, n) -> (j, n)`` rows ``r -> M⁻¹ r`` (``None``: none).
        augment: ``(e, n)`` further right-hand sides that only widen the block.
        damping: ``λ >= 0`` added to the diagonal of ``A``.
        tol: Preconditioned relative residual at which the wanted solves count as done.
        max_iterations: Iteration cap (default ``4 n``).
        deadline: ``time.perf_counter()`` value past which no further iteration starts
            (:class:`MeasurementTimeoutError`).

    Example:
        >>> a = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
        >>> b = torch.ones(1, 8, dtype=torch.float64)
        >>> alone = block_conjugate_gradient(lambda v: v @ a, b)
        >>> extra = torch.rand(3, 8, generator=torch.Generator().manual_seed(0))
        >>> wide = block_conjugate_gradient(lambda v: v @ a, b, augment=extra)
        >>> torch.allclose(wide.solution @ a, b), alone.iterations, wide.iterations  # 8 unknowns
        (True, (8,), (2,))
    """
    damping = check_float("damping", damping, low=0.0)
    b, cap, apply = _cg_setup(rhs, precondition, max_iterations)
    wanted = len(b)
    r = b if augment is None else torch.cat([b, augment.to(b)])
    x = torch.zeros_like(r)
    z = apply(r)
    scale = (r[:wanted] * z[:wanted]).sum(1).clamp_min(1e-300)
    p, iterations = _orthonormal_rows(z), 0
    while True:
        rel = ((r[:wanted] * z[:wanted]).sum(1).clamp_min(0) / scale).sqrt()
        if iterations >= cap or not len(p) or bool((rel <= tol).all()):
            break
        if deadline is not None and time.perf_counter() > deadline:
            raise MeasurementTimeoutError(f"block CG stopped after {iterations} iterations")
        q = matmul(p).to(torch.float64) + damping * p
        pq = p @ q.T
        pq = (pq + pq.T) / 2
        alpha = torch.linalg.solve(pq, p @ r.T)
        x, r = x + alpha.T @ p, r - alpha.T @ q
        z = apply(r)
        p = _orthonormal_rows(z - torch.linalg.solve(pq, q @ z.T).T @ p)
        iterations += 1
    return BlockCGResult(
        x[:wanted], (iterations,) * wanted, bool((rel <= tol).all()), tuple(rel.tolist())
    )


def _cg_setup(
    rhs: Tensor, precondition: Callable[[Tensor], Tensor] | None, max_iterations: int | None
) -> tuple[Tensor, int, Callable[[Tensor], Tensor]]:
    """``(float64 right-hand sides, iteration cap (default 4 n), r -> M⁻¹ r in float64)``."""
    b = rhs.to(torch.float64)
    cap = (
        4 * b.shape[1]
        if max_iterations is None
        else check_int("max_iterations", max_iterations, low=1)
    )
    if precondition is None:
        return b, cap, lambda r: r
    return b, cap, lambda r: precondition(r).to(torch.float64)


def _orthonormal_rows(rows: Tensor, rcond: float = 1e-10) -> Tensor:
    """An orthonormal basis (as rows) of the span of ``rows``, dependent directions dropped."""
    u, s, _ = torch.linalg.svd(rows.T, full_matrices=False)
    return u[:, s > rcond * s.max().clamp_min(1e-300)].T.contiguous()


class GramPreconditioner:
    """``M = J_S J_Sᵀ + ε I``, the Gram matrix of the first layers, factorised once.

    ``J_S J_Sᵀ ⪯ J Jᵀ`` (for piecewise-linear networks exactly; the Gauss-Newton form
    otherwise), so ``M⁻¹ J Jᵀ`` keeps the spectrum of the deeper layers only: on the models of
    ``benchmarks/i2f_scale.py`` preconditioned CG needs tens of iterations where plain CG needs
    thousands. ``ε`` is the smallest of ``1e-10, 1e-8, ... x λ_max(M)`` for which the Cholesky
    factorisation succeeds. Up to ``explicit_limit`` values ``M⁻¹`` is formed once: a
    triangular solve with a few right-hand sides runs at memory speed and cost 45 ms per CG
    iteration at ``d_x = 3072`` against 8 ms for the product with ``M⁻¹`` (the inverse takes as
    long as about a dozen solves).

    Args:
        gram: The dense prefix Gram matrix (float64).
        explicit_limit: Largest size for which ``M⁻¹`` is formed explicitly.

    Example:
        >>> m = GramPreconditioner(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)))
        >>> m.solve(torch.tensor([[4.0, 1.0]], dtype=torch.float64)).round(decimals=6)
        tensor([[1., 1.]], dtype=torch.float64)
    """

    def __init__(self, gram: Tensor, *, explicit_limit: int = 4096) -> None:
        gram = gram.to(torch.float64)
        n = gram.shape[0]
        top = float(torch.linalg.eigvalsh(gram)[-1]) if n <= 64 else float(gram.diagonal().sum())
        self._cholesky = RidgedCholesky(gram, top, explicit_limit=explicit_limit)
        self.ridge, self.factor = self._cholesky.ridge, self._cholesky.factor
        self.inverse = self._cholesky.inverse

    def solve(self, rows: Tensor) -> Tensor:
        """``M⁻¹ r`` for every row ``r``."""
        return self._cholesky.solve(rows)

    def trace_inverse(self) -> float:
        """``tr(M⁻¹)``, exactly."""
        return self._cholesky.trace_inverse()


#: What :class:`PreconditionedGramSolver` needs of ``M``: ``solve(rows)`` and ``trace_inverse()``.
Preconditioner = GramPreconditioner | StemPreconditioner


@dataclass(frozen=True)
class PreconditionedGramSolver(GramSolver):
    """Matrix-free, preconditioned by the first layers' Gram matrix ``M``.

    ``M`` is the first layer's in closed form, solved through its factors
    (:class:`~.leakage_stem.StemPreconditioner`), or the first layers' from column passes
    (:class:`GramPreconditioner`); :meth:`build` chooses. Solves by batched preconditioned CG
    (every draw of δ in one product per iteration), the Gaussian trace ``tr((J Jᵀ)⁻¹)`` as
    ``tr(M⁻¹)`` (exact) plus a Hutchinson estimate of ``tr((J Jᵀ)⁻¹ - M⁻¹)`` (a control
    variate: the probes only see what ``M`` misses), ``λ_max`` by Lanczos (riding in the CG
    batches in :meth:`solve_with_lanczos`). Converged to ``tol=1e-6`` it is exact for every
    purpose here; with a loose ``tol`` it is the ``"approximate"`` estimator (its norms then come
    out low by about ``tol`` or less).

    Args:
        operator: The example's :class:`LeakageOperator`.
        preconditioner: ``M`` (see :meth:`build`).
        damping: ``λ >= 0``.
        lanczos_seed: Seed of the Lanczos start vector.
        num_probes: Hutchinson probes.
        generator: Source of the probes.
        tol: Preconditioned relative residual of the solves.
        max_iterations: Iteration cap per solve.
        lanczos_tol: Relative Ritz residual of ``λ_max``.
        lanczos_iterations: Lanczos steps at most.
        deadline: ``time.perf_counter()`` value past which no iteration starts.
        warn: Warn when a solve stops at ``max_iterations`` before ``tol``.
        block_size: ``0``: one recurrence per right-hand side; ``s > 0``: one block CG
            (:func:`block_conjugate_gradient`) over the right-hand sides padded with random
            vectors (seeded by ``lanczos_seed``) to ``s`` rows, at most one batched pass of
            the products less the Lanczos row (``chunk_size - 1``: a second pass would cost
            as much again).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> op = LeakageOperator(model, torch.randn(1, 3), torch.tensor([1]))
        >>> dense, pcg = gram_solver(op, method="dense"), gram_solver(op, method="pcg")
        >>> b = torch.randn(2, 3)
        >>> torch.allclose(pcg.solve(b).solution, dense.solve(b).solution, rtol=1e-4)
        True
    """

    method: ClassVar[str] = "pcg"
    operator: LeakageOperator
    preconditioner: Preconditioner
    damping: float = 0.0
    lanczos_seed: int = 0
    num_probes: int = 16
    generator: torch.Generator | None = None
    tol: float = 1e-6
    max_iterations: int | None = None
    lanczos_tol: float = 1e-6
    lanczos_iterations: int = 64
    deadline: float | None = None
    warn: bool = True
    block_size: int = 0

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, low=0)

    @classmethod
    def build(
        cls,
        op: LeakageOperator,
        *,
        ratio: float = PREFIX_RATIO,
        preconditioner: str = "auto",
        deadline: float | None = None,
        **kwargs: Any,
    ) -> PreconditionedGramSolver:
        """The solver of ``op`` with ``M`` from its first layers (see :data:`PRECONDITIONERS`).

        Args:
            op: The example's operator.
            ratio: ``"prefix"``: the layers hold ``ratio * d_x`` observed parameters.
            preconditioner: ``"stem"`` (the first layer's Gram matrix in closed form,
                :meth:`~.leakage_products.GramProducts.stem_gram`; ``"prefix"`` where the first
                layer does not read the input unchanged), ``"prefix"`` (the first layers'
                Gram matrix from ``d_x`` batched column passes) or ``"auto"`` (``"stem"`` for
                piecewise-linear networks whose stem spans the input, see :func:`chosen_stem`;
                ``"prefix"`` otherwise).
            deadline: ``time.perf_counter()`` value past which no further pass starts.
            **kwargs: The solver's other fields.

        Example:
            >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([1]))
            >>> PreconditionedGramSolver.build(op).method
            'pcg'
        """
        check_choice("preconditioner", preconditioner, PRECONDITIONERS)
        products = op.batched_products()
        if products is None:
            gram = torch.eye(op.input_dim, dtype=torch.float64, device=op.gradient.device)
            return cls(op, GramPreconditioner(gram), deadline=deadline, **kwargs)
        stem = chosen_stem(products, preconditioner)
        if stem is not None:
            return cls(op, _stem_preconditioner(stem), deadline=deadline, **kwargs)
        gram = products.prefix_gram(ratio=ratio, deadline=deadline)
        return cls(op, GramPreconditioner(gram), deadline=deadline, **kwargs)

    def _matmul(self, rows: Tensor) -> Tensor:
        return self.operator.gram_matmul(rows).to(torch.float64)

    def _solve(
        self,
        rows: Tensor,
        tol: float | None = None,
        matmul: Callable[[Tensor], Tensor] | None = None,
    ) -> BlockCGResult:
        rows = rows.reshape(-1, self.operator.input_dim)
        kwargs: dict[str, Any] = dict(
            damping=self.damping,
            tol=self.tol if tol is None else tol,
            max_iterations=self.max_iterations,
            deadline=self.deadline,
        )
        matmul = self._matmul if matmul is None else matmul
        if self.block_size == 0:
            return preconditioned_conjugate_gradient(
                matmul, rows, self.preconditioner.solve, **kwargs
            )
        products = self.operator.batched_products()
        width = (
            self.block_size if products is None else min(self.block_size, products.chunk_size - 1)
        )
        augment = self._augment(max(0, width - len(rows)))
        return block_conjugate_gradient(
            matmul, rows, self.preconditioner.solve, augment=augment, **kwargs
        )

    def _augment(self, count: int) -> Tensor | None:
        """``count`` Gaussian rows that widen a block solve (seeded by ``lanczos_seed``)."""
        if count == 0:
            return None
        device = self.operator.gradient.device
        gen = torch.Generator(device=device).manual_seed(self.lanczos_seed + 7919)
        shape = (count, self.operator.input_dim)
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float64)

    def solve(self, rows: Tensor) -> GramSolution:
        """Batched preconditioned CG; warns when a solve stops before ``tol``."""
        return self._solution(self._solve(rows))

    def solve_with_lanczos(self, rows: Tensor) -> tuple[GramSolution, LanczosResult]:
        """The solves and ``λ_max`` from the same batched products.

        The Lanczos vector rides as one more row in every conjugate-gradient product (one row
        costs a fraction of a batched pass); if it needs more steps than the solves, it finishes
        alone.
        """
        iteration = self._lanczos_iteration()

        def matmul(batch: Tensor) -> Tensor:
            if iteration.done:
                return self._matmul(batch)
            out = self._matmul(torch.cat([batch, iteration.vector[None].to(batch.dtype)]))
            iteration.step(out[-1])
            return out[:-1]

        run = self._solve(rows, matmul=matmul)
        while not iteration.done:
            iteration.step(self._matmul(iteration.vector[None])[0])
        return self._solution(run), iteration.result()

    def _solution(self, run: BlockCGResult) -> GramSolution:
        if self.warn and not run.converged:
            warnings.warn(
                f"Preconditioned conjugate gradients stopped before tol={self.tol} (iterations "
                f"{run.iterations}); the I2F is approximate. Raise `max_iterations`.",
                stacklevel=4,
            )
        return GramSolution(run.solution, run.iterations, run.converged)

    def trace_inverse(self) -> float:
        """``tr(M⁻¹)`` plus Hutchinson's estimate of what ``M`` misses (damped: Hutchinson's)."""
        probes = _rademacher_probes(self.num_probes, self.operator, self.generator)
        w = self._solve(probes).solution
        if self.damping > 0:
            return float((w * self._matmul(w)).sum(1).mean())
        correction = (probes * (w - self.preconditioner.solve(probes))).sum(1).mean()
        return self.preconditioner.trace_inverse() + float(correction)

    def trace(self) -> float:
        """Hutchinson's estimate of ``tr(J Jᵀ)`` (batched products)."""
        probes = _rademacher_probes(self.num_probes, self.operator, self.generator)
        return float((probes * self._matmul(probes)).sum(1).mean())

    def lanczos(self) -> LanczosResult:
        """Lanczos on ``v -> J Jᵀ v`` to ``lanczos_tol``."""
        iteration = self._lanczos_iteration()
        while not iteration.done:
            iteration.step(self._matmul(iteration.vector[None])[0])
        return iteration.result()

    def _lanczos_iteration(self) -> LanczosIteration:
        device = self.operator.gradient.device
        return LanczosIteration(
            self.operator.input_dim,
            max_iterations=self.lanczos_iterations,
            tol=self.lanczos_tol,
            generator=torch.Generator(device=device).manual_seed(self.lanczos_seed),
            device=device,
        )


def chosen_stem(products: GramProducts, preconditioner: str = "auto") -> StemGram | None:
    """The stem factors ``preconditioner`` asks for, or ``None`` for the generic prefix.

    ``"auto"`` takes the stem for a piecewise-linear network whose first layer reads the input
    and spans it (:attr:`~.leakage_stem.StemGram.spans_input`); ``"stem"`` whenever the first
    layer reads the input.

    Example:
        >>> relu = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                            torch.nn.Linear(8, 2))
        >>> products = GramProducts(relu, torch.randn(1, 4), torch.tensor([1]))
        >>> chosen_stem(products) is not None, chosen_stem(products, "prefix")
        (True, None)
    """
    check_choice("preconditioner", preconditioner, PRECONDITIONERS)
    if preconditioner == "prefix":
        return None
    if preconditioner == "auto" and not (
        products.mode == "piecewise_linear" and products.stem_can_span()
    ):
        return None
    stem = products.stem_factors()
    if stem is None or (preconditioner == "auto" and not stem.spans_input):
        return None
    return stem


def _stem_preconditioner(stem: StemGram) -> Preconditioner:
    """The factored stem preconditioner, or its dense form where the factors do not serve.

    Without an observed weight the block is empty (Woodbury would invert ``ε I``); a singular
    capacitance shows as a non-finite solve of a probe.
    """
    if stem.block is not None:
        factored = StemPreconditioner(stem)
        probe = torch.ones(1, stem.size, dtype=torch.float64, device=stem.block.device)
        if bool(torch.isfinite(factored.solve(probe)).all()):
            return factored
    return GramPreconditioner(stem.dense())


def gram_solver(
    op: LeakageOperator,
    *,
    method: str = "auto",
    dense_limit: int = 4096,
    damping: float = 0.0,
    lanczos_seed: int = 0,
    num_probes: int = 16,
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
    max_iterations: int | None = None,
    deadline: float | None = None,
) -> GramSolver:
    """The Gram solver for ``op``: dense when ``method="dense"`` or ``"auto"`` and small inputs.

    Args:
        op: The example's operator.
        method: ``"dense"`` (assemble and factorise ``J Jᵀ``), ``"pcg"`` (matrix-free,
            preconditioned by the first layers' Gram matrix), ``"cg"`` (matrix-free, plain) or
            ``"auto"`` (dense when ``d_x <= dense_limit``, else ``"pcg"``).
        dense_limit: Largest input dimension for the dense path under ``"auto"``.
        damping: ``λ >= 0``.
        lanczos_seed: Seed of the Lanczos start vector.
        num_probes: Hutchinson probes per trace (matrix-free only).
        generator: Source of the probes (matrix-free only).
        tol: CG tolerance (matrix-free only).
        max_iterations: CG iteration cap (matrix-free only).
        deadline: ``time.perf_counter()`` value past which no further batch of products starts
            (:class:`MeasurementTimeoutError`).

    Raises:
        ValueError: For an unknown ``method``.

    Example:
        >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([1]))
        >>> gram_solver(op).method, gram_solver(op, dense_limit=2).method
        ('dense', 'pcg')
    """
    chosen = _method(op, method, dense_limit)
    if chosen == "dense":
        return DenseGramSolver.assemble(
            op, damping=damping, lanczos_seed=lanczos_seed, deadline=deadline
        )
    if chosen == "pcg":
        return PreconditionedGramSolver.build(
            op,
            deadline=deadline,
            damping=damping,
            lanczos_seed=lanczos_seed,
            num_probes=num_probes,
            generator=generator,
            tol=tol,
            max_iterations=max_iterations,
        )
    return MatrixFreeGramSolver(
        op, damping, lanczos_seed, num_probes, generator, tol=tol, max_iterations=max_iterations
    )


def _rademacher_probes(
    num_probes: int, op: LeakageOperator, generator: torch.Generator | None
) -> Tensor:
    """``(num_probes, d_x)`` float64 ±1 entries, drawn on the generator's device (CPU if none)."""
    device = generator.device if generator is not None else torch.device("cpu")
    z = torch.randint(0, 2, (num_probes, op.input_dim), generator=generator, device=device)
    return (z.to(torch.float64) * 2 - 1).to(op.gradient.device)


@dataclass(frozen=True)
class I2FResult:
    """I2F values for ``k`` draws of δ on one batch.

    Attributes:
        value: ``(k,)`` I2F over the whole batch (L2 norm over every input value).
        per_sample: ``(k, B)`` norm of each sample's block of the predicted reconstruction error.
        jdelta_norm: ``(k,)`` ``‖J δ‖``.
        damping: The damping ``λ`` used.
        method: ``"dense"`` (factorised ``J Jᵀ``) or ``"cg"`` (matrix-free conjugate gradients).
        iterations: CG iterations per draw (empty for ``"dense"``).
        converged: Whether every CG solve converged (``True`` for ``"dense"``).

    Example:
        >>> op = LeakageOperator(torch.nn.Linear(3, 2), torch.randn(1, 3), torch.tensor([1]))
        >>> res = i2f_from_operator(op, torch.zeros(2, op.param_dim))
        >>> res.value, res.per_sample.shape, res.method
        (tensor([0., 0.], dtype=torch.float64), torch.Size([2, 1]), 'dense')
    """

    value: Tensor
    per_sample: Tensor
    jdelta_norm: Tensor
    damping: float
    method: str
    iterations: tuple[int, ...] = ()
    converged: bool = True


def _method(op: LeakageOperator, method: str, dense_limit: int) -> str:
    if method not in METHODS:
        raise ValueError(
            f"Expected `method` to be one of {', '.join(map(repr, METHODS))}, but got {method!r}."
        )
    if method == "auto":
        return "dense" if op.input_dim <= dense_limit else "pcg"
    return method


def i2f_from_operator(
    op: LeakageOperator,
    delta: Delta,
    *,
    damping: float = 0.0,
    factorization: GramFactorization | None = None,
    method: str = "auto",
    dense_limit: int = 4096,
    tol: float = 1e-6,
    max_iterations: int | None = None,
) -> I2FResult:
    """I2F for an already built operator (and optionally a reused factorisation).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
        >>> op = LeakageOperator(model, torch.randn(1, 3), torch.tensor([0]))
        >>> fact = GramFactorization(op.gram())
        >>> draws = 1e-3 * torch.randn(5, op.param_dim)
        >>> i2f_from_operator(op, draws, factorization=fact).value.shape
        torch.Size([5])
    """
    damping = check_float("damping", damping, low=0.0)
    rows = op.jdelta_rows(delta)
    solver = (
        DenseGramSolver(factorization, damping)
        if factorization is not None
        else gram_solver(
            op,
            method=method,
            dense_limit=dense_limit,
            damping=damping,
            tol=tol,
            max_iterations=max_iterations,
        )
    )
    solved = solver.solve(rows)
    batch = op.input_shape[0] if len(op.input_shape) > 1 else 1
    return I2FResult(
        value=solved.solution.norm(dim=-1),
        per_sample=solved.solution.reshape(len(rows), batch, -1).norm(dim=-1),
        jdelta_norm=rows.norm(dim=-1),
        damping=damping,
        method=solver.method,
        iterations=solved.iterations,
        converged=solved.converged,
    )


@full_precision()
def i2f(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    delta: Delta,
    *,
    damping: float = 0.0,
    loss_fn: LossFn = F.cross_entropy,
    layers: str | Sequence[str] | None = None,
    method: str = "auto",
    dense_limit: int = 4096,
    tol: float = 1e-6,
    max_iterations: int | None = None,
) -> I2FResult:
    """Exact I2F ``‖(J Jᵀ + λ I)⁻¹ J δ‖``: predicted L2 error of a perfect attacker under δ.

    The batch is one joint reconstruction problem (the batch-mean loss, as shared); ``per_sample``
    splits the predicted error by example. For the single-example view, call it per example.

    Args:
        model: The network (read only).
        inputs: The private batch (floating point, in the model's input space).
        targets: Its labels (known to the attacker).
        delta: Perturbation of the observed gradient: tensors shaped like the observed parameters,
            a ``{name: tensor}`` mapping, a flat ``(d_θ,)`` tensor or ``(k, d_θ)`` draws.
        damping: ``λ >= 0``. The paper's I2F is ``λ = 0``; damping ``>~ 1e-4 λ_max`` loses the
            ranking of images (it approaches ``‖Jδ‖ / λ``).
        loss_fn: Loss with the reduction of the shared gradient.
        layers: Parameters whose gradient is observed (as ``GradientDefense(layers=)``).
        method: ``"dense"`` (factorise ``J Jᵀ`` once), ``"cg"`` (matrix-free conjugate gradients
            from zero per draw) or ``"auto"`` (dense when ``d_x <= dense_limit``).
        dense_limit: Largest input dimension for the dense path under ``"auto"``.
        tol: CG relative residual tolerance.
        max_iterations: CG iteration cap.

    Returns:
        An :class:`I2FResult`; ``.value`` has one entry per δ draw.

    Raises:
        ValueError: On a δ of the wrong shapes, non-finite δ, negative damping, or no
            differentiable path from inputs to the gradient.
        TypeError: On integer inputs (use embeddings).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> x, y = torch.randn(1, 3), torch.tensor([0])
        >>> delta = [torch.zeros_like(p) for p in model.parameters()]
        >>> float(i2f(model, x, y, delta).value)
        0.0
    """
    damping = check_float("damping", damping, low=0.0)
    op = LeakageOperator(model, inputs, targets, loss_fn=loss_fn, layers=layers)
    return i2f_from_operator(
        op,
        delta,
        damping=damping,
        method=method,
        dense_limit=dense_limit,
        tol=tol,
        max_iterations=max_iterations,
    )


@dataclass(frozen=True)
class LowerBoundResult:
    """The lower bound ``‖J δ‖ / λ_max(J Jᵀ)`` and how ``λ_max`` was found.

    Attributes:
        value: ``(k,)`` lower bounds, one per δ draw.
        jdelta_norm: ``(k,)`` ``‖J δ‖``.
        lambda_max: ``λ_max(J Jᵀ)``.
        lanczos: Iterations, convergence and residual of the Lanczos run.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> res = i2f_lower_bound(model, torch.randn(1, 3), torch.tensor([1]), torch.zeros(8))
        >>> float(res.value[0]), res.lambda_max == res.lanczos.value
        (0.0, True)
    """

    value: Tensor
    jdelta_norm: Tensor
    lambda_max: float
    lanczos: LanczosResult


def i2f_lower_bound(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    delta: Delta,
    *,
    loss_fn: LossFn = F.cross_entropy,
    layers: str | Sequence[str] | None = None,
    max_iterations: int = 64,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> LowerBoundResult:
    """The paper's lower bound ``‖J δ‖ / λ_max(J Jᵀ)`` (Eq. 5), ``λ_max`` by matrix-free Lanczos.

    It scales with ``‖δ‖`` but not with *which* images leak: at a fixed noise level it ranks
    images about as well as ``‖δ‖`` alone, and on the DLG LeNet it is ~1e4 below :func:`i2f`.
    Use it as a cheap sanity floor, not as the leakage metric.

    Args:
        model: The network.
        inputs: The batch.
        targets: Its labels.
        delta: Perturbation (see :func:`i2f`).
        loss_fn: Loss with the reduction of the shared gradient.
        layers: Observed parameters.
        max_iterations: Lanczos steps at most (each one ``Jᵀ`` and one ``J`` product).
        tol: Relative Ritz-residual tolerance.
        generator: Generator of the Lanczos start vector.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> delta = [torch.ones_like(p) for p in model.parameters()]
        >>> r = i2f_lower_bound(model, torch.randn(1, 3), torch.tensor([1]), delta)
        >>> r.lanczos.converged, r.lanczos.iterations <= 3
        (True, True)
    """
    op = LeakageOperator(model, inputs, targets, loss_fn=loss_fn, layers=layers)
    rows = op.jdelta_rows(delta)
    lanczos = lanczos_lambda_max(
        lambda v: op.gram_matvec(v).to(torch.float64),
        op.input_dim,
        max_iterations=max_iterations,
        tol=tol,
        generator=generator,
        device=op.gradient.device,
    )
    norms = rows.norm(dim=-1)
    return LowerBoundResult(norms / lanczos.value, norms, lanczos.value, lanczos)


def expected_gaussian_i2f(
    factorization: GramFactorization, *, std: float, damping: float = 0.0
) -> float:
    """Root-mean-square I2F of Gaussian noise ``δ ~ N(0, std² I)`` without drawing δ.

    ``sqrt(E I2F²) = std · sqrt(Σ λ_i / (λ_i + λ)²)``, i.e. ``std · sqrt(tr((J Jᵀ)⁻¹))`` undamped,
    computed exactly from the factorisation of ``J Jᵀ``.

    Example:
        >>> f = GramFactorization(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)))
        >>> round(expected_gaussian_i2f(f, std=2.0), 6)
        2.236068
    """
    std = check_float("std", std, low=0.0)
    damping = check_float("damping", damping, low=0.0)
    return std * math.sqrt(factorization.trace_inverse(damping))


def hutchinson_trace_inverse(
    op: LeakageOperator,
    *,
    num_probes: int = 16,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iterations: int | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Matrix-free estimate of ``Σ λ_i / (λ_i + λ)²`` (``tr((J Jᵀ)⁻¹)`` undamped) for large inputs.

    Hutchinson's estimator with Rademacher probes ``z``: the mean of ``wᵀ (J Jᵀ) w`` with
    ``w = (J Jᵀ + λ I)⁻¹ z`` (one CG solve and one product per probe). Unbiased; its relative
    standard error falls like ``1 / sqrt(num_probes)``. Use it only when ``J Jᵀ`` is too large to
    assemble (``GramFactorization.trace_inverse`` is exact).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> op = LeakageOperator(model, torch.randn(1, 3, dtype=torch.float64), torch.tensor([0]))
        >>> exact = GramFactorization(op.gram()).trace_inverse()
        >>> est = hutchinson_trace_inverse(op, num_probes=400, generator=torch.Generator())
        >>> 0.5 < est / exact < 1.5
        True
    """
    check_int("num_probes", num_probes, low=1)
    damping = check_float("damping", damping, low=0.0)
    total = 0.0
    for z in _rademacher_probes(num_probes, op, generator):
        w = conjugate_gradient(
            lambda v: op.gram_matvec(v).to(torch.float64),
            z,
            damping=damping,
            tol=tol,
            max_iterations=max_iterations,
        ).solution
        total += float(w @ op.gram_matvec(w).to(torch.float64))
    return total / num_probes


def predicted_psnr(
    i2f_value: Tensor | float, num_values: int, *, data_range: float = 1.0
) -> Tensor:
    """PSNR in dB a perfect attacker would reach: ``MSE = I2F² / num_values``.

    Args:
        i2f_value: I2F (L2 norm of the reconstruction error).
        num_values: Number of input values the error is spread over (``C*H*W`` per image).
        data_range: Value range of the inputs (1 for images in [0, 1]).

    Example:
        >>> float(predicted_psnr(torch.tensor(1.0), 100))
        20.0
    """
    check_int("num_values", num_values, low=1)
    check_float("data_range", data_range, low=0.0, low_open=True)
    value = torch.as_tensor(i2f_value, dtype=torch.float64)
    mse = value.clamp_min(1e-300) ** 2 / num_values
    return 10.0 * torch.log10(data_range**2 / mse)
