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

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Generator, Tensor, nn

from lightning_privacy.functional.attacks.common import (
    GradientMatcher,
    Gradients,
    LossFn,
    Reconstruction,
    Stopwatch,
    Trial,
    best_of_restarts,
    build_reconstruction,
    check_num_samples,
    given_or_restored_labels,
)

INITS = ("uniform", "randn")
LABEL_STRATEGIES = ("joint", "idlg")


def initial_inputs(
    shape: Sequence[int],
    init: str,
    box: tuple[float, float] | None,
    generator: Generator | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """A dummy batch on ``device``: uniform inside ``box`` (or ``[0, 1]``) or standard normal.

    Drawn on the generator's device (a CUDA generator draws on the GPU, a CPU one on the CPU, so
    a seed gives the same start wherever the model lives), then moved to ``device``.

    Example:
        >>> x = initial_inputs((2, 3), "uniform", (0.0, 1.0), torch.Generator().manual_seed(0))
        >>> bool((x >= 0).all() and (x <= 1).all())
        True
    """
    if init == "randn":
        return random_tensor(torch.randn, shape, generator, dtype, device)
    low, high = box if box is not None else (0.0, 1.0)
    return low + (high - low) * random_tensor(torch.rand, shape, generator, dtype, device)


def random_tensor(
    draw: Callable[..., Tensor],
    shape: Sequence[int],
    generator: Generator | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> Tensor:
    """``draw(shape)`` (``torch.rand``/``randn``) on the generator's device, then on ``device``.

    Example:
        >>> random_tensor(torch.randn, (2,), torch.Generator().manual_seed(0)).shape
        torch.Size([2])
    """
    source = generator.device if generator is not None else device
    return draw(tuple(shape), generator=generator, dtype=dtype, device=source).to(device)


def _given_or_random_start(
    start: Tensor | None,
    shape: Sequence[int],
    init: str,
    box: tuple[float, float] | None,
    generator: Generator | None,
    device: torch.device,
) -> Tensor:
    """A copy of the user's ``start``, else a random dummy batch on ``device``."""
    if start is not None:
        return start.detach().clone()
    return initial_inputs(shape, init, box, generator, device=device)


def _joint_logits(
    fixed: Tensor | None, shape: tuple[int, int], generator: Generator | None, device: torch.device
) -> Tensor | None:
    """Random label logits to optimise jointly (DLG), or ``None`` when the labels are fixed."""
    return (
        None if fixed is not None else random_tensor(torch.randn, shape, generator, device=device)
    )


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
    restored = labels_known or label_strategy == "idlg"  # else "joint": labels are optimised
    fixed = (
        given_or_restored_labels(model, matcher.target, num_samples, labels) if restored else None
    )
    num_classes = _num_outputs(model, matcher, shape)
    clock = Stopwatch(max_seconds)
    rule = _StoppingRule(max_iterations, tol * float(matcher.target_norm) ** 2, clock)
    lbfgs = _lbfgs(lr, inner_iterations, history_size, line_search)

    def run_trial() -> Trial:
        x = _given_or_random_start(start, shape, init, box, generator, matcher.device)
        y_logits = _joint_logits(fixed, (num_samples, num_classes), generator, matcher.device)
        return _DummyBatch(matcher, x, y_logits, fixed, lbfgs).run(rule)

    kept, trial_losses, evaluations = best_of_restarts(
        run_trial, restarts, stop=lambda trial: rule.converged(trial.loss) or clock.expired()
    )
    return build_reconstruction(
        model,
        inputs=kept.inputs.clamp(*box) if box is not None else kept.inputs,
        labels=kept.labels,
        history=kept.history,
        labels_known=labels_known,
        attack="deep_leakage" if label_strategy == "joint" or labels_known else "idlg",
        trial_losses=trial_losses,
        evaluations=evaluations,
        seconds=clock.seconds(),
        label_strategy="given" if labels_known else label_strategy,
    )


def _lbfgs(
    lr: float, inner_iterations: int, history_size: int, line_search: bool
) -> Callable[[list[Tensor]], torch.optim.LBFGS]:
    """DLG's optimiser for given leaves: L-BFGS, with a strong-Wolfe line search or unit steps."""
    return functools.partial(
        torch.optim.LBFGS,
        lr=lr,
        max_iter=inner_iterations,
        history_size=history_size,
        line_search_fn="strong_wolfe" if line_search else None,
    )


class _DummyBatch:
    """One DLG trial's dummies -- inputs, and soft-label logits or fixed labels -- and L-BFGS."""

    def __init__(
        self,
        matcher: GradientMatcher,
        x: Tensor,
        y_logits: Tensor | None,
        fixed: Tensor | None,
        lbfgs: Callable[[list[Tensor]], torch.optim.LBFGS],
    ) -> None:
        self.matcher = matcher
        self.x = x.requires_grad_(True)
        self.y_logits = y_logits.requires_grad_(True) if y_logits is not None else None
        self.fixed = fixed
        self.leaves = [self.x] if self.y_logits is None else [self.x, self.y_logits]
        self.optimizer = lbfgs(self.leaves)
        self.evaluations = 0
        self.latest = math.inf

    def targets(self) -> Tensor:
        """The label targets: softmax of the logits (joint) or the fixed labels."""
        targets = F.softmax(self.y_logits, dim=-1) if self.y_logits is not None else self.fixed
        assert targets is not None
        return targets

    def closure(self) -> Tensor:
        """The L2 matching loss at the current dummies, their gradients set by hand."""
        self.evaluations += 1
        self.optimizer.zero_grad()
        loss = self.matcher.l2(self.x, self.targets())
        for leaf, grad in zip(self.leaves, torch.autograd.grad(loss, self.leaves), strict=True):
            leaf.grad = grad  # never .backward(): nothing outside the dummies is touched
        self.latest = float(loss.detach())
        return loss.detach()

    def step(self) -> float:
        """One L-BFGS step; the loss at the last evaluated point (the accepted one)."""
        self.optimizer.step(self.closure)
        return self.latest

    def run(self, rule: _StoppingRule) -> Trial:
        """L-BFGS steps until ``rule`` stops them; the last history entry is the final loss."""
        history = rule.history(self.step)
        final = float(self.matcher.l2(self.x, self.targets()).detach())
        final = final if math.isfinite(final) else math.inf
        if history:
            history[-1] = final
        guess = self.y_logits.detach().argmax(-1) if self.y_logits is not None else self.targets()
        return Trial(
            loss=final,
            inputs=self.x.detach().clone(),
            labels=guess.clone(),
            history=history,
            evaluations=self.evaluations,
        )


@dataclass(frozen=True)
class _StoppingRule:
    """When a trial stops: step budget, success, a non-finite loss, a stall, or time out."""

    max_iterations: int
    threshold: float
    clock: Stopwatch

    def converged(self, loss: float) -> bool:
        """Success: the loss is below ``tol * ||g*||^2``."""
        return loss < self.threshold

    def history(self, step: Callable[[], float]) -> list[float]:
        """The losses of the steps taken (``inf`` for a non-finite one, which ends the trial)."""
        history: list[float] = []
        last = math.inf
        stalled = 0
        for _ in range(self.max_iterations):
            current = step()
            if not math.isfinite(current):
                history.append(math.inf)
                break
            history.append(current)
            if self.converged(current):
                break
            stalled = stalled + 1 if abs(last - current) <= 1e-12 * max(1.0, abs(last)) else 0
            if stalled >= 3 or self.clock.expired():
                break
            last = current
        return history


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
