"""Inverting Gradients (Geiping, Bauermeister, Droege, Moeller, NeurIPS 2020) as a pure function.

Objective: ``1 - <g(x), g*> / (||g(x)|| ||g*||) + alpha_TV * TV(x)`` with the cosine taken over
all layers at once; Adam (lr 0.1) on the *sign* of the input gradient, the learning rate cut by
10 at 3/8, 5/8 and 7/8 of the run, inputs clamped to the valid box after every step, and the
iterate with the smallest objective kept; restarts keep the best trial.

Speed: the input gradient of the cosine term is ``J^T v`` with
``v = -g*/(||g|| ||g*||) + <g, g*> g / (||g||^3 ||g*||)``. It is computed exactly as the input
gradient of a forward-mode directional derivative
(:func:`~lightning_privacy.functional.gradients.gradient_product_input_grad`) after one ordinary
backward pass for ``g``, which avoids double backpropagation (``method="forward_mode"``). With
BatchNorm in train mode (running statistics updated in the dual pass) the classic double-backward
path is used (``method="double_backward"``; ``"auto"`` chooses).

Example:
    >>> import torch
    >>> from lightning_privacy.functional.attacks.common import observed_gradients_of
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(),
    ...                           torch.nn.Linear(8, 4))
    >>> x = torch.rand(1, 1, 4, 4)
    >>> g = observed_gradients_of(net, x, torch.tensor([2]))
    >>> rec = inverting_gradients(net, g, input_shape=(1, 4, 4), num_samples=1,
    ...                           max_iterations=200, tv_weight=0.0,
    ...                           generator=torch.Generator().manual_seed(0))
    >>> rec.labels.tolist(), rec.history[-1] < rec.history[0]
    ([2], True)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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
    bn_mode,
    build_reconstruction,
    check_num_samples,
    given_or_restored_labels,
    total_variation,
)
from lightning_privacy.functional.attacks.dlg import initial_inputs
from lightning_privacy.functional.gradients import gradient_product_input_grad

METHODS = ("auto", "forward_mode", "double_backward")
PLATEAU_TOLERANCE = 1e-3  # relative improvement of the best objective that is not a plateau


class BatchNormPrior:
    """GradInversion's BatchNorm-statistics prior (Yin et al., CVPR 2021; DeepInversion).

    ``weight * sum_l (||mean_l(x') - mu_l||_2 + ||var_l(x') - sigma2_l||_2)`` over the model's
    BatchNorm layers, where ``mean_l``/``var_l`` are the per-channel statistics of the layer's
    input on the dummy batch and ``mu_l``/``sigma2_l`` the layer's ``running_mean`` and
    ``running_var`` when the prior is built: the statistics the attacker knows. With BatchNorm in
    train mode, put the client's batch statistics there (``bn_stats_known``); in eval mode they
    are the population statistics the model already holds.

    The statistics are read by forward hooks while :meth:`watching`; the hooks are removed on
    exit and nothing of the model changes.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)).train()
        >>> prior = BatchNormPrior(net, weight=1.0)
        >>> with prior.watching():
        ...     _ = net(torch.randn(4, 1, 5, 5))
        >>> float(prior.pop()) > 0, len(net[1]._forward_hooks)
        (True, 0)
    """

    def __init__(self, model: nn.Module, weight: float) -> None:
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.weight = weight
        self.known = {
            id(m): (m.running_mean.detach().clone(), m.running_var.detach().clone())
            for m in norms
            if m.running_mean is not None and m.running_var is not None
        }
        self.norms = [m for m in norms if id(m) in self.known]
        self.terms: list[Tensor] = []

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Collect the prior's terms of every forward pass inside the block."""
        handles = [m.register_forward_hook(self._hook) for m in self.norms]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0]
        dims = [0, *range(2, x.dim())]
        mean, var = self.known[id(module)]
        self.terms.append(
            torch.linalg.vector_norm(x.mean(dims) - mean)
            + torch.linalg.vector_norm(x.var(dims, unbiased=False) - var)
        )

    def pop(self) -> Tensor:
        """The weighted sum of the terms collected so far (then forgotten)."""
        total = self.weight * torch.stack(self.terms).sum() if self.terms else torch.zeros(())
        self.terms = []
        return total


def _cosine_and_input_grad(
    matcher: GradientMatcher,
    x: Tensor,
    labels: Tensor,
    method: str,
    prior: BatchNormPrior | None = None,
) -> tuple[float, Tensor]:
    """``(1 - cos(g(x), g*) [+ the BN prior], d/dx of it)``."""
    if method == "double_backward":
        leaf = x.detach().requires_grad_(True)
        watching = prior.watching() if prior is not None else contextlib.nullcontext()
        with torch.enable_grad(), watching:
            objective = matcher.cosine(leaf, labels)
            if prior is not None:
                objective = objective + prior.pop()
            (grad,) = torch.autograd.grad(objective, leaf)
        return float(objective.detach()), grad
    names = list(matcher.target)
    with torch.no_grad():
        dummy = matcher.dummy_detached(x, labels)
        target = matcher.target_list
        dot = torch.stack(
            [torch.dot(d.flatten(), t.flatten()) for d, t in zip(dummy, target, strict=True)]
        )
        sq = torch.stack([torch.dot(d.flatten(), d.flatten()) for d in dummy])
        dot_sum, norm = dot.sum(), sq.sum().sqrt()
        tnorm = matcher.target_norm
        denom = (norm * tnorm).clamp_min(1e-30)
        value = 1.0 - float(dot_sum / denom)
        c_target = float(-1.0 / denom)
        c_dummy = float(dot_sum / (norm.clamp_min(1e-30) ** 2 * denom))
        vectors = torch._foreach_mul(target, c_target)
        torch._foreach_add_(vectors, dummy, alpha=c_dummy)
    grad = gradient_product_input_grad(
        matcher.model, x, labels, dict(zip(names, vectors, strict=True)), loss_fn=matcher.loss_fn
    )
    return value, grad


def inverting_gradients(
    model: nn.Module,
    gradients: Gradients,
    *,
    input_shape: Sequence[int],
    num_samples: int,
    labels: Tensor | None = None,
    loss_fn: LossFn = F.cross_entropy,
    max_iterations: int = 24_000,
    lr: float = 0.1,
    tv_weight: float = 0.2,
    restarts: int = 1,
    init: str = "randn",
    box: tuple[float, float] | None = (0.0, 1.0),
    signed: bool = True,
    decay: bool = True,
    method: str = "auto",
    patience: int | None = None,
    bn_weight: float = 0.0,
    max_seconds: float | None = None,
    generator: Generator | None = None,
    callback: Callable[[int, float, Tensor], None] | None = None,
) -> Reconstruction:
    """Reconstruct inputs from an observed gradient by cosine gradient matching.

    Args:
        model: The attacked model (read only, in its current train/eval mode).
        gradients: Observed gradient, one tensor per trainable parameter or a name mapping.
        input_shape: Shape of one input without the batch dimension.
        num_samples: Batch size of the observed gradient.
        labels: Known labels; otherwise restored from the last layer (iDLG for one sample,
            Yin et al.'s row minima for a batch).
        loss_fn: The training loss.
        max_iterations: Adam steps per trial (paper: 24,000).
        lr: Adam learning rate (0.1).
        tv_weight: Weight of the total-variation prior.
        restarts: Trials; the one with the smallest objective is kept.
        init: ``"randn"`` (paper) or ``"uniform"`` (in the box).
        box: Valid input range (clamped after every step), or ``None``.
        signed: Use the sign of the input gradient (paper: yes).
        decay: Learning rate x0.1 at 3/8, 5/8, 7/8 of the run.
        method: ``"forward_mode"``, ``"double_backward"`` or ``"auto"``.
        patience: Early stopping on a plateau (paper: ``None``, never): when the best objective
            has improved by less than 0.1 % over ``patience`` steps, the learning rate drops to
            its next stage at once, and a plateau in the last stage ends the trial.
        bn_weight: Weight of the BatchNorm-statistics prior (:class:`BatchNormPrior`, needs
            ``method`` ``"double_backward"`` or ``"auto"``); ``0`` (paper): none. The
            statistics in the model's BatchNorm buffers are taken as known.
        max_seconds: Stop (keeping the best iterate) after this wall time, or ``None``.
        generator: Source of the random starts.
        callback: Called after every step as ``callback(step, objective, inputs)`` with the
            trial's best objective so far and its inputs (what the attack would return if it
            stopped now; do not modify them), e.g. to trace quality against time.

    Returns:
        The best iterate of the best trial, the labels used, objective history, metadata.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> g = [torch.randn(p.shape) for p in net.parameters()]
        >>> rec = inverting_gradients(net, g, input_shape=(1, 2, 2), num_samples=1,
        ...                           max_iterations=3)
        >>> len(rec.history), bool(rec.inputs.min() >= 0)
        (3, True)
    """
    num_samples = check_num_samples(num_samples)
    shape = (num_samples, *input_shape)
    matcher = GradientMatcher(model, gradients, loss_fn=loss_fn)
    used = given_or_restored_labels(model, matcher.target, num_samples, labels)
    method, prior = _method_and_prior(model, method, bn_weight)
    milestones = [round(max_iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)] if decay else []
    clock = Stopwatch(max_seconds)
    settings: dict[str, Any] = dict(tv_weight=tv_weight, lr=lr, box=box, signed=signed)
    settings.update(patience=patience, callback=callback, prior=prior)
    descent = _SignedAdam(
        matcher,
        used,
        method,
        milestones=milestones,
        max_iterations=max_iterations,
        clock=clock,
        **settings,
    )
    kept, trial_objectives, iterations = best_of_restarts(
        lambda: descent.run(initial_inputs(shape, init, box, generator, device=matcher.device)),
        restarts,
        stop=lambda _: clock.expired(),
    )
    return build_reconstruction(
        model,
        inputs=kept.inputs,
        labels=used,
        history=kept.history,
        labels_known=labels is not None,
        attack="inverting_gradients",
        trial_objectives=trial_objectives,
        iterations=iterations,
        method=method,
        seconds=clock.seconds(),
        **({} if prior is None else {"bn_prior": bn_weight, "bn_stats_known": True}),
    )


def _method_and_prior(
    model: nn.Module, method: str, bn_weight: float
) -> tuple[str, BatchNormPrior | None]:
    """How ``J^T v`` is computed (``"auto"`` resolved) and the BN prior, if any."""
    if bn_weight > 0:
        if method == "forward_mode":
            raise ValueError(
                "Expected method='double_backward' or 'auto' with the BatchNorm prior "
                f"(bn_weight={bn_weight}), but got method='forward_mode'."
            )
        return "double_backward", BatchNormPrior(model, bn_weight)
    if method == "auto":
        method = "double_backward" if bn_mode(model) == "train" else "forward_mode"
    return method, None


@dataclass(frozen=True)
class _SignedAdam:
    """One Inverting Gradients run's settings: (signed) Adam on cosine matching plus TV."""

    matcher: GradientMatcher
    labels: Tensor
    method: str
    tv_weight: float
    lr: float
    milestones: list[int]
    max_iterations: int
    box: tuple[float, float] | None
    signed: bool
    clock: Stopwatch
    patience: int | None = None
    callback: Callable[[int, float, Tensor], None] | None = None
    prior: BatchNormPrior | None = None

    def objective(self, x: Tensor) -> tuple[float, Tensor]:
        """``1 - cos(g(x), g*) + tv_weight * TV(x) [+ BN prior]`` and its input gradient."""
        value, grad = _cosine_and_input_grad(self.matcher, x, self.labels, self.method, self.prior)
        if self.tv_weight > 0:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                tv = total_variation(leaf)
                (tv_grad,) = torch.autograd.grad(tv, leaf)
            value += self.tv_weight * float(tv.detach())
            grad = grad + self.tv_weight * tv_grad
        return value, grad

    def run(self, start: Tensor) -> Trial:
        """Steps from ``start`` until the budget, a last-stage plateau, NaN or time out.

        The best iterate is kept; the trial's loss is its objective (``inf`` if none was
        finite).
        """
        x = start.requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=self.lr)
        stages = _Stages(self.milestones, self.patience)
        best_value, best_x = math.inf, x.detach().clone()
        history: list[float] = []
        evaluations = 0
        for step in range(self.max_iterations):
            value, grad = self.objective(x.detach())
            evaluations += 1
            if not math.isfinite(value):
                break
            history.append(value)
            if value < best_value:
                best_value, best_x = value, x.detach().clone()
            decays = stages.decays(step, best_value)
            if decays is None:
                break
            if decays:
                for group in optimizer.param_groups:
                    group["lr"] = group["lr"] * 0.1**decays
            x.grad = grad.sign() if self.signed else grad
            optimizer.step()
            if self.box is not None:
                with torch.no_grad():
                    x.clamp_(*self.box)
            if self.callback is not None:
                self.callback(step, best_value, best_x)
            if self.clock.expired():
                break
        return Trial(
            loss=best_value, inputs=best_x, labels=None, history=history, evaluations=evaluations
        )


class _Stages:
    """Learning-rate stages: x0.1 at each milestone, or on a plateau first; stop on the last one's.

    Without ``patience`` this is ``MultiStepLR(milestones, gamma=0.1)`` step by step (the same
    products). With it, a stage ends early when the best objective has improved by less than
    :data:`PLATEAU_TOLERANCE` (relative) over ``patience`` steps, and a plateau in the last stage
    ends the run.
    """

    def __init__(self, milestones: list[int], patience: int | None) -> None:
        self.milestones = milestones
        self.patience = patience
        self.stage = 0
        self.mark, self.mark_step = math.inf, 0

    def decays(self, step: int, best: float) -> int | None:
        """How many x0.1 decays apply from ``step`` on; ``None`` to stop before it."""
        scheduled = sum(1 for m in self.milestones if m <= step)
        target = max(self.stage, scheduled)
        if self.patience is not None and step - self.mark_step >= self.patience:
            if best > self.mark - PLATEAU_TOLERANCE * abs(self.mark):
                if self.stage >= len(self.milestones):
                    return None
                target = max(target, self.stage + 1)
            self.mark, self.mark_step = best, step
        if self.patience is not None and target > self.stage:
            self.mark, self.mark_step = best, step
        decays, self.stage = target - self.stage, target
        return decays
