"""Deep Leakage from Gradients (DLG) and its iDLG variant, as pure functions.

DLG (Zhu, Liu, Han, NeurIPS 2019) minimises the squared L2 distance between the dummy gradient
and the observed one, ``sum_l ||g_l(x', softmax(y')) - g*_l||^2``, jointly over dummy inputs
``x'`` and dummy label logits ``y'``, with L-BFGS (lr 1, history 100, 20 inner evaluations per
step, 300 steps). iDLG (Zhao, Mopuri, Bilen, 2020) first reads the label off the last layer's
gradient (:func:`~lightning_privacy.functional.attacks.common.restore_labels`) and optimises only
``x'``.

Three changes make the attack reliable without looking at the true input: the dummy starts
inside the valid box (uniform in ``[0, 1]``) instead of ``N(0, 1)``; L-BFGS uses a strong-Wolfe
line search instead of fixed unit steps, which is what makes DLG diverge on some images; and
several restarts are run, keeping the one with the smallest gradient-matching loss -- the loss
itself separates a success (~1e-6 or less) from a divergence (> 1), so restarts stop as soon as
one trial reaches ``tol``.

Example:
    >>> import torch
    >>> from lightning_privacy.functional.attacks.common import observed_gradients_of
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Sigmoid(),
    ...                             torch.nn.Linear(5, 3))
    >>> x, y = torch.rand(1, 6), torch.tensor([1])
    >>> g = observed_gradients_of(model, x, y)
    >>> rec = deep_leakage(model, g, input_shape=(6,), num_samples=1, max_iterations=50,
    ...                    generator=torch.Generator().manual_seed(0))
    >>> bool((rec.inputs - x).abs().max() < 1e-2), rec.labels.tolist()
    (True, [1])
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Generator, Tensor, nn

from lightning_privacy.functional.attacks.common import (
    GradientMatcher,
    Gradients,
    LossFn,
    Reconstruction,
    check_num_samples,
    restore_labels,
    threat_metadata,
)

INITS = ("uniform", "randn")
LABEL_STRATEGIES = ("joint", "idlg")


def initial_inputs(
    shape: Sequence[int],
    init: str,
    box: tuple[float, float] | None,
    generator: Generator | None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A dummy batch: uniform inside ``box`` (or ``[0, 1]``) or standard normal.

    Example:
        >>> x = initial_inputs((2, 3), "uniform", (0.0, 1.0), torch.Generator().manual_seed(0))
        >>> bool((x >= 0).all() and (x <= 1).all())
        True
    """
    if init == "randn":
        return torch.randn(tuple(shape), generator=generator, dtype=dtype)
    low, high = box if box is not None else (0.0, 1.0)
    return low + (high - low) * torch.rand(tuple(shape), generator=generator, dtype=dtype)


def deep_leakage(
    model: nn.Module,
    gradients: Gradients,
    *,
    input_shape: Sequence[int],
    num_samples: int,
    labels: Tensor | None = None,
    loss_fn: LossFn = F.cross_entropy,
    max_iterations: int = 300,
    lr: float = 1.0,
    inner_iterations: int = 20,
    history_size: int = 100,
    line_search: bool = True,
    restarts: int = 4,
    init: str = "uniform",
    box: tuple[float, float] | None = (0.0, 1.0),
    tol: float = 1e-8,
    label_strategy: str = "joint",
    max_seconds: float | None = None,
    generator: Generator | None = None,
    start: Tensor | None = None,
) -> Reconstruction:
    """Reconstruct inputs (and labels) from an observed gradient by L2 gradient matching.

    Args:
        model: The attacked model, used read-only in its current train/eval mode.
        gradients: Observed gradient, one tensor per trainable parameter or a name mapping.
        input_shape: Shape of one input, without the batch dimension.
        num_samples: Batch size the gradient was computed on.
        labels: Known labels; then only inputs are optimised.
        loss_fn: The training loss; it must accept probability targets (joint labels).
        max_iterations: L-BFGS outer steps per trial (DLG: 300).
        lr: L-BFGS learning rate (DLG: 1).
        inner_iterations: Function evaluations per L-BFGS step (PyTorch default 20).
        history_size: L-BFGS memory (DLG: 100).
        line_search: Strong-Wolfe line search (DLG: none).
        restarts: Trials; the one with the smallest matching loss is kept.
        init: ``"uniform"`` in the box or ``"randn"`` (DLG).
        box: Valid input range the start is drawn from and the result clamped to.
        tol: A trial stops, and no further restart runs, once the loss is below
            ``tol * ||g*||^2`` (relative, so that it means the same for any gradient scale).
        label_strategy: Without ``labels``: ``"joint"`` (DLG, soft labels optimised) or
            ``"idlg"`` (read from the last layer's gradient, then fixed).
        max_seconds: Stop (keeping the best trial so far) after this wall time, or ``None``.
        generator: Source of the random starts.
        start: A ``(num_samples, *input_shape)`` batch every trial starts from instead of a
            random draw (a warm start from a prior image; started at the true inputs, the attack
            finds the solution nearest to them, the I2F's "perfect attacker"). Use
            ``restarts=1`` with it: the trials would be identical.

    Raises:
        ValueError: If ``start`` has the wrong shape or non-finite values.

    Returns:
        The kept trial: inputs, labels (argmax of the optimised soft labels for ``"joint"``),
        its loss history, and metadata (per-trial losses, threat model, seconds).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sigmoid(),
        ...                           torch.nn.Linear(4, 2))
        >>> g = [torch.zeros(p.shape) for p in net.parameters()]
        >>> rec = deep_leakage(net, g, input_shape=(3,), num_samples=1, max_iterations=2,
        ...                    restarts=1, labels=torch.tensor([0]))
        >>> tuple(rec.inputs.shape), rec.metadata["labels_known"]
        ((1, 3), True)
    """
    num_samples = check_num_samples(num_samples)
    shape = (num_samples, *input_shape)
    _check_start(start, shape)
    matcher = GradientMatcher(model, gradients, loss_fn=loss_fn)
    labels_known = labels is not None
    fixed: Tensor | None = None
    if labels is not None:
        fixed = labels.reshape(-1).long()
    elif label_strategy == "idlg":
        fixed = restore_labels(model, matcher.target, num_samples)
    num_classes = _num_outputs(model, matcher, shape)
    started = time.perf_counter()
    best: tuple[float, Tensor, Tensor, list[float]] | None = None
    trial_losses: list[float] = []
    evaluations = 0
    latest = math.inf
    threshold = tol * float(matcher.target_norm) ** 2
    for _ in range(restarts):
        x = (
            initial_inputs(shape, init, box, generator) if start is None else start.detach().clone()
        ).requires_grad_(True)
        leaves = [x]
        y_logits: Tensor | None = None
        if fixed is None:
            y_logits = torch.randn(num_samples, num_classes, generator=generator)
            y_logits.requires_grad_(True)
            leaves.append(y_logits)
        optimizer = torch.optim.LBFGS(
            leaves,
            lr=lr,
            max_iter=inner_iterations,
            history_size=history_size,
            line_search_fn="strong_wolfe" if line_search else None,
        )
        y_fixed = fixed

        def closure(
            x: Tensor = x,
            leaves: list[Tensor] = leaves,
            y_logits: Tensor | None = y_logits,
            y_fixed: Tensor | None = y_fixed,
            optimizer: torch.optim.Optimizer = optimizer,
        ) -> Tensor:
            nonlocal evaluations, latest
            evaluations += 1
            optimizer.zero_grad()
            targets = F.softmax(y_logits, dim=-1) if y_logits is not None else y_fixed
            assert targets is not None
            loss = matcher.l2(x, targets)
            for leaf, grad in zip(leaves, torch.autograd.grad(loss, leaves), strict=True):
                leaf.grad = grad  # never .backward(): nothing outside the dummies is touched
            latest = float(loss.detach())
            return loss.detach()

        history: list[float] = []
        latest = math.inf
        last = math.inf
        stalled = 0
        for _ in range(max_iterations):
            optimizer.step(closure)
            current = latest  # the loss at the last evaluated point (the accepted one)
            if not math.isfinite(current):
                history.append(math.inf)
                break
            history.append(current)
            if current < threshold:
                break
            stalled = stalled + 1 if abs(last - current) <= 1e-12 * max(1.0, abs(last)) else 0
            if stalled >= 3 or _out_of_time(started, max_seconds):
                break
            last = current
        targets = F.softmax(y_logits, -1) if y_logits is not None else fixed
        assert targets is not None
        final = float(matcher.l2(x, targets).detach())
        final = final if math.isfinite(final) else math.inf
        if history:
            history[-1] = final
        trial_losses.append(final)
        if best is None or final < best[0]:
            guess = y_logits.detach().argmax(-1) if y_logits is not None else targets
            best = (final, x.detach().clone(), guess.clone(), history)
        if final < threshold or _out_of_time(started, max_seconds):
            break
    assert best is not None  # restarts >= 1 is validated by the caller
    _, inputs, guess, history = best
    if box is not None:
        inputs = inputs.clamp(*box)
    metadata = threat_metadata(model, labels_known=labels_known)
    metadata.update(
        attack="deep_leakage" if label_strategy == "joint" or labels_known else "idlg",
        trial_losses=trial_losses,
        evaluations=evaluations,
        seconds=time.perf_counter() - started,
        label_strategy="given" if labels_known else label_strategy,
    )
    return Reconstruction(inputs=inputs, labels=guess, history=history, metadata=metadata)


def _check_start(start: Tensor | None, shape: tuple[int, ...]) -> None:
    if start is None:
        return
    if not isinstance(start, Tensor) or tuple(start.shape) != shape:
        got = list(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise ValueError(
            f"Expected `start` of shape (num_samples, *input_shape) = {list(shape)}, but got {got}."
        )
    if not bool(torch.isfinite(start).all()):
        raise ValueError("Expected `start` to be finite, but it holds NaN or inf entries.")


def _num_outputs(model: nn.Module, matcher: GradientMatcher, shape: tuple[int, ...]) -> int:
    """Number of classes: the model's output width on a zero batch (no state is touched)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        out = torch.func.functional_call(model, {**buffers, **params}, (torch.zeros(shape),))
    return int(out.shape[-1])


def _out_of_time(start: float, max_seconds: float | None) -> bool:
    return max_seconds is not None and time.perf_counter() - start > max_seconds
