"""What every gradient-inversion attack shares: the result type, gradient matching, priors.

The attacker sees ``gradients`` (one tensor per trainable parameter, in ``named_parameters``
order, or a ``{name: tensor}`` mapping for a subset) and the model. The dummy gradient is
computed with :func:`lightning_privacy.functional.gradients.parameter_gradients`
(``torch.func.functional_call`` on detached parameters and cloned buffers), so an attack never
writes ``.grad``, BatchNorm statistics or anything else on the model.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.rand(1, 4), torch.tensor([2])
    >>> target = observed_gradients_of(model, x, y)
    >>> matcher = GradientMatcher(model, target, loss_fn=torch.nn.functional.cross_entropy)
    >>> float(matcher.l2(x.requires_grad_(), y).detach()) < 1e-12
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_privacy.functional.gradients import (
    CachedGradient,
    parameter_gradients,
    select_parameters,
)

LossFn = Callable[[Tensor, Tensor], Tensor]
Gradients = Sequence[Tensor] | Mapping[str, Tensor]


@dataclass(frozen=True)
class Reconstruction:
    """The result of an attack.

    Attributes:
        inputs: Reconstructed inputs, ``(num_samples, *input_shape)`` (token ids for text).
        labels: Reconstructed (or given) labels, ``(num_samples,)`` int64, or ``None``.
        history: Objective value after each outer step of the kept trial.
        metadata: Free-form facts about the run: ``bn_mode`` (``"train"``/``"eval"``/``"none"``),
            ``bn_stats_known``, ``labels_known``, per-restart objective values, iterations, ...

    Example:
        >>> rec = Reconstruction(inputs=torch.zeros(1, 3), labels=None, history=[2.0, 0.5])
        >>> rec.objective
        0.5
    """

    inputs: Tensor
    labels: Tensor | None
    history: list[float] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def objective(self) -> float:
        """Final objective value of the kept trial (``nan`` if none was recorded)."""
        return self.history[-1] if self.history else float("nan")


def bn_mode(model: nn.Module) -> str:
    """``"none"`` without BatchNorm, else ``"train"`` or ``"eval"`` (the mode the attack sees).

    Example:
        >>> bn_mode(torch.nn.BatchNorm1d(2).eval()), bn_mode(torch.nn.Linear(2, 2))
        ('eval', 'none')
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return "none"
    return "train" if any(m.training for m in norms) else "eval"


def threat_metadata(model: nn.Module, *, labels_known: bool) -> dict[str, Any]:
    """The threat-model facts recorded with every reconstruction.

    In eval mode the attacker's model uses the running statistics it holds, i.e. it knows the
    BatchNorm statistics; in train mode BatchNorm uses the dummy batch's own statistics.

    Example:
        >>> threat_metadata(torch.nn.Linear(2, 2), labels_known=True)["bn_mode"]
        'none'
    """
    mode = bn_mode(model)
    return {"bn_mode": mode, "bn_stats_known": mode == "eval", "labels_known": labels_known}


def build_reconstruction(
    model: nn.Module,
    *,
    inputs: Tensor,
    labels: Tensor | None,
    history: list[float],
    labels_known: bool,
    **facts: Any,
) -> Reconstruction:
    """An attack's result, its metadata the threat-model facts followed by ``facts`` in order.

    Example:
        >>> rec = build_reconstruction(torch.nn.Linear(2, 2), inputs=torch.zeros(1, 2),
        ...                            labels=None, history=[], labels_known=False, attack="demo")
        >>> rec.metadata
        {'bn_mode': 'none', 'bn_stats_known': False, 'labels_known': False, 'attack': 'demo'}
    """
    metadata = threat_metadata(model, labels_known=labels_known)
    metadata.update(facts)
    return Reconstruction(inputs=inputs, labels=labels, history=history, metadata=metadata)


def resolve_gradients(model: nn.Module, gradients: Gradients) -> dict[str, Tensor]:
    """Name the observed gradients after the model's trainable parameters.

    Args:
        model: The attacked model.
        gradients: A sequence aligned with the trainable parameters (``named_parameters`` order)
            or a ``{name: tensor}`` mapping of a subset of them.

    Raises:
        ValueError: If the count, a name or a shape does not match the model.

    Example:
        >>> m = torch.nn.Linear(2, 3)
        >>> sorted(resolve_gradients(m, [torch.zeros(3, 2), torch.zeros(3)]))
        ['bias', 'weight']
    """
    params = select_parameters(model)
    if isinstance(gradients, Mapping):
        named = dict(gradients)
        unknown = [n for n in named if n not in params]
        if unknown:
            raise ValueError(
                f"Expected gradient names to be trainable parameters of the model, but got "
                f"{unknown[:3]}. Parameter names look like: {list(params)[:5]}."
            )
    else:
        grads = list(gradients)
        if len(grads) != len(params):
            raise ValueError(
                f"Expected one gradient per trainable parameter ({len(params)}), but got "
                f"{len(grads)}. Pass a {{name: tensor}} mapping to attack a subset."
            )
        named = dict(zip(params, grads, strict=True))
    for name, grad in named.items():
        if tuple(grad.shape) != tuple(params[name].shape):
            raise ValueError(
                f"Expected the gradient of `{name}` to have shape {tuple(params[name].shape)}, "
                f"but got {tuple(grad.shape)}."
            )
    return {n: g.detach() for n, g in named.items()}


def observed_gradients_of(
    model: nn.Module, inputs: Tensor, labels: Tensor, *, loss_fn: LossFn = F.cross_entropy
) -> list[Tensor]:
    """The gradient a client would send for ``(inputs, labels)``, one tensor per parameter.

    Example:
        >>> [g.shape for g in observed_gradients_of(torch.nn.Linear(2, 3), torch.rand(1, 2),
        ...                                         torch.tensor([0]))]
        [torch.Size([3, 2]), torch.Size([3])]
    """
    return [
        g.detach() for g in parameter_gradients(model, inputs, labels, loss_fn=loss_fn).values()
    ]


class GradientMatcher:
    """Dummy gradients and matching losses against a fixed observed gradient.

    Args:
        model: The attacked model (read only).
        gradients: The observed gradient (see :func:`resolve_gradients`).
        loss_fn: The training loss; must accept soft (probability) targets for joint label
            optimisation, as ``torch.nn.functional.cross_entropy`` does.

    Example:
        >>> m = torch.nn.Linear(3, 2)
        >>> x, y = torch.rand(1, 3), torch.tensor([1])
        >>> matcher = GradientMatcher(m, observed_gradients_of(m, x, y), loss_fn=F.cross_entropy)
        >>> abs(float(matcher.cosine(x, y).detach())) < 1e-6  # the true input matches exactly
        True
    """

    def __init__(self, model: nn.Module, gradients: Gradients, *, loss_fn: LossFn) -> None:
        self.model = model
        self.target = resolve_gradients(model, gradients)
        all_params = select_parameters(model)
        self.params = {n: all_params[n] for n in self.target}
        self.loss_fn = loss_fn
        self._grad = CachedGradient(model, list(self.target))
        self.target_list = list(self.target.values())
        self.target_norm = torch.sqrt(_total([(g * g).sum() for g in self.target_list]))

    @property
    def device(self) -> torch.device:
        """Where the observed gradient, hence the model, lives: the dummies are made there."""
        return self.target_list[0].device

    def dummy(self, inputs: Tensor, targets: Tensor) -> list[Tensor]:
        """Gradient of the loss at ``(inputs, targets)`` with the graph kept (double backprop)."""
        return self._grad(inputs, targets, loss_fn=self.loss_fn, create_graph=True)

    def dummy_detached(self, inputs: Tensor, targets: Tensor) -> list[Tensor]:
        """Gradient of the loss at ``(inputs, targets)`` without a graph (one backward pass)."""
        return [g.detach() for g in self._grad(inputs, targets, loss_fn=self.loss_fn)]

    def l2(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """DLG's objective: ``sum_l ||g_l(x', y') - g*_l||^2``."""
        dummy = self.dummy(inputs, targets)
        return _total([((d - t) ** 2).sum() for d, t in zip(dummy, self.target_list, strict=True)])

    def cosine(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Inverting Gradients' objective: ``1 - <g', g*> / (||g'|| ||g*||)`` over all layers."""
        dummy = self.dummy(inputs, targets)
        dot = _total([(d * t).sum() for d, t in zip(dummy, self.target_list, strict=True)])
        norm = torch.sqrt(_total([(d * d).sum() for d in dummy]))
        return 1.0 - dot / (norm * self.target_norm).clamp_min(1e-30)


def _total(values: list[Tensor]) -> Tensor:
    """Sum of scalar tensors (one autograd node)."""
    return torch.stack(values).sum()


def total_variation(images: Tensor) -> Tensor:
    """Anisotropic L1 total variation: mean ``|dx|`` + mean ``|dy|`` (Geiping et al., 2020).

    Example:
        >>> float(total_variation(torch.ones(1, 1, 4, 4)))
        0.0
    """
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy


def last_linear(model: nn.Module, target: Mapping[str, Tensor]) -> tuple[str, str | None]:
    """Names of the weight (and bias) gradient of the model's last ``nn.Linear`` layer.

    Raises:
        ValueError: If the model has no linear layer or its weight gradient was not observed.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 3))
        >>> last_linear(m, {n: p for n, p in m.named_parameters()})
        ('1.weight', '1.bias')
    """
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    if name is None:
        raise ValueError("Expected the model to end in an nn.Linear layer, but it has none.")
    prefix = f"{name}." if name else ""
    weight, bias = f"{prefix}weight", f"{prefix}bias"
    if weight not in target:
        raise ValueError(f"Expected the gradient of `{weight}` (the last linear layer).")
    return weight, bias if bias in target else None


LABEL_RULES = ("auto", "count", "sign", "yin")


def restore_labels(
    model: nn.Module, gradients: Gradients, num_samples: int, *, rule: str = "auto"
) -> Tensor:
    """Labels from the last linear layer's gradient, without any optimisation.

    * One sample (iDLG, Zhao et al., 2020): the true class is the only row of the last weight
      gradient with a negative sum (``dL/dz_c = p_c - 1[c = y]`` times non-negative features);
      with a bias, its gradient is ``dL/dz`` itself and the negative entry is the label.
    * ``"count"``, a batch with a bias (count estimate, the idea of Breaching's
      ``bias-corrected`` strategy): the mean-reduced bias gradient is ``db_c = pbar_c - n_c / B``;
      classes absent from the batch have ``db_c = pbar_c > 0``, so their mean estimates the
      softmax mass ``pbar`` of the present ones, ``n_c ~ B (pbar - db_c)``, rounded by largest
      remainders to sum to ``B``. Handles repeated labels.
    * ``"yin"`` (GradInversion, Yin et al., CVPR 2021, Breaching's ``yin``): the ``num_samples``
      classes whose weight-gradient rows have the most negative minimum; exact for distinct
      labels and non-negative features (repeats cycle through the order).
    * ``"sign"`` (iDLG's rule read on a batch): the classes with a negative bias gradient
      (weight-row sum without a bias), most negative first, each once, cycled to ``num_samples``.

    Args:
        model: The attacked model (its last ``nn.Linear`` is read).
        gradients: The observed gradient.
        num_samples: Batch size.
        rule: ``"auto"`` (iDLG for one sample, else ``"count"`` with a bias and ``"yin"``
            without), or one rule for any batch size.

    Returns:
        ``(num_samples,)`` int64 labels (a batch's in ascending class order).

    Example:
        >>> m = torch.nn.Linear(5, 4)
        >>> g = observed_gradients_of(m, torch.rand(1, 5), torch.tensor([3]))
        >>> restore_labels(m, g, 1)
        tensor([3])
        >>> g = observed_gradients_of(m, torch.rand(3, 5), torch.tensor([0, 0, 2]))
        >>> restore_labels(m, g, 3).tolist(), restore_labels(m, g, 3, rule="sign").tolist()
        ([0, 0, 2], [0, 0, 2])
    """
    from lightning_privacy._validation import check_choice

    check_choice("rule", rule, LABEL_RULES)
    target = resolve_gradients(model, gradients)
    weight, bias = last_linear(model, target)
    if rule == "auto":
        rule = "idlg" if num_samples == 1 else ("count" if bias is not None else "yin")
    row = target[bias] if bias is not None else target[weight].sum(dim=1)
    if rule == "idlg":
        return row.argmin().reshape(1)
    if rule == "count":
        if bias is None:
            raise ValueError("Expected a bias on the last linear layer for rule='count'.")
        return _count_labels(target[bias], num_samples)
    if rule == "sign":
        order = row.argsort()
        order = order[: max(int((row < 0).sum()), 1)]
    else:
        order = target[weight].min(dim=1).values.argsort()
    reps = (num_samples + order.numel() - 1) // order.numel()
    return order.repeat(reps)[:num_samples].sort().values


def given_or_restored_labels(
    model: nn.Module, gradients: Gradients, num_samples: int, labels: Tensor | None
) -> Tensor:
    """The given ``labels`` as a flat int64 tensor, else :func:`restore_labels`' estimate.

    Raises:
        ValueError: If no labels are given and the last linear layer's gradient is not observed.

    Example:
        >>> m = torch.nn.Linear(5, 4)
        >>> g = observed_gradients_of(m, torch.rand(1, 5), torch.tensor([3]))
        >>> given_or_restored_labels(m, g, 1, None)
        tensor([3])
        >>> given_or_restored_labels(m, g, 1, torch.tensor([[1]]))
        tensor([1])
    """
    if labels is not None:
        return labels.reshape(-1).long()
    return restore_labels(model, gradients, num_samples)


def _count_labels(bias_grad: Tensor, num_samples: int) -> Tensor:
    """Label counts from a mean-reduced bias gradient (see :func:`restore_labels`)."""
    db = bias_grad.double()
    absent = db > 0
    pbar = db[absent].mean() if bool(absent.any()) else torch.zeros((), dtype=db.dtype)
    counts = (num_samples * (pbar - db)).clamp_min(0.0)
    if float(counts.sum()) <= 0:
        counts = (-db).clamp_min(0.0) + 1e-12
    counts = counts * (num_samples / counts.sum())
    whole = counts.floor()
    remainder = int(num_samples - whole.sum())
    if remainder > 0:
        whole[(counts - whole).argsort(descending=True)[:remainder]] += 1
    return torch.repeat_interleave(torch.arange(len(db)), whole.long())


def check_num_samples(num_samples: Any) -> int:
    """Validate ``num_samples`` (an int >= 1).

    Example:
        >>> check_num_samples(2)
        2
    """
    from lightning_privacy._validation import check_int

    return check_int("num_samples", num_samples, low=1)


class Stopwatch:
    """Wall time since construction, against an optional budget (``max_seconds``).

    Example:
        >>> Stopwatch().expired(), Stopwatch(max_seconds=-1.0).expired(), Stopwatch().seconds() >= 0
        (False, True, True)
    """

    def __init__(self, max_seconds: float | None = None) -> None:
        self.max_seconds = max_seconds
        self.started = time.perf_counter()

    def seconds(self) -> float:
        """Seconds since the stopwatch was started."""
        return time.perf_counter() - self.started

    def expired(self) -> bool:
        """Whether the budget is spent (never without one)."""
        return self.max_seconds is not None and self.seconds() > self.max_seconds


@dataclass(frozen=True)
class Trial:
    """One run of an iterative attack from one start.

    Attributes:
        loss: What trials are ranked by (smaller is better; ``inf`` for a diverged run).
        inputs: The run's kept inputs.
        labels: The run's labels, or ``None`` where all runs share them.
        history: Objective value after each outer step.
        evaluations: Objective evaluations the run spent.

    Example:
        >>> Trial(loss=0.5, inputs=torch.zeros(1, 2), labels=None, history=[1.0, 0.5],
        ...       evaluations=2).loss
        0.5
    """

    loss: float
    inputs: Tensor
    labels: Tensor | None
    history: list[float]
    evaluations: int


def best_of_restarts(
    run_trial: Callable[[], Trial], restarts: int, *, stop: Callable[[Trial], bool]
) -> tuple[Trial, list[float], int]:
    """Run up to ``restarts`` trials, keeping the one with the smallest loss (the first of equals).

    Args:
        run_trial: Runs one trial from a fresh start.
        restarts: Most trials to run (at least one).
        stop: Whether no further trial runs after this one (success or time out).

    Returns:
        The kept trial, the loss of every trial run, and their evaluations in all.

    Example:
        >>> losses = iter([3.0, 1.0, 2.0, 0.0])
        >>> def run_trial():
        ...     return Trial(loss=next(losses), inputs=torch.zeros(1), labels=None, history=[],
        ...                  evaluations=2)
        >>> kept, trial_losses, evaluations = best_of_restarts(
        ...     run_trial, 4, stop=lambda trial: trial.loss < 2.5 and trial.loss > 1.5)
        >>> kept.loss, trial_losses, evaluations
        (1.0, [3.0, 1.0, 2.0], 6)
    """
    kept: Trial | None = None
    losses: list[float] = []
    evaluations = 0
    for _ in range(restarts):
        trial = run_trial()
        losses.append(trial.loss)
        evaluations += trial.evaluations
        if kept is None or trial.loss < kept.loss:
            kept = trial
        if stop(trial):
            break
    assert kept is not None  # restarts >= 1 is validated by the caller
    return kept, losses, evaluations
