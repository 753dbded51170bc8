"""DLG and iDLG as configured, registered components.

Example:
    >>> from lightning_privacy.attacks import DeepLeakage
    >>> DeepLeakage().max_iterations, DeepLeakage.original().line_search
    (300, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_privacy._validation import check_choice, check_float, check_int
from lightning_privacy.attacks.base import ATTACKS, Attack
from lightning_privacy.functional.attacks.dlg import INITS, deep_leakage


def _check_box(box: tuple[float, float] | None) -> None:
    if box is None:
        return
    if (
        not isinstance(box, tuple)
        or len(box) != 2
        or not all(isinstance(v, (int, float)) for v in box)
        or not box[0] < box[1]
    ):
        raise ValueError(f"Expected `box` to be None or a (low, high) tuple, but got {box!r}.")


@ATTACKS.register("deep_leakage")
@dataclass(frozen=True)
class DeepLeakage(Attack):
    """Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019), made reliable.

    Minimises ``sum_l ||g_l(x', softmax(y')) - g*_l||^2`` over dummy inputs and soft labels with
    L-BFGS. Paper preset: L-BFGS lr 1, history 100, 20 evaluations per step, 300 steps,
    ``N(0, 1)`` start, no line search, one trial (``DeepLeakage.original()``). The defaults keep
    the optimiser, budget and objective and add what the paper's code lacks: a start inside
    the valid box, a strong-Wolfe line search, and up to 4 restarts chosen by the matching loss
    (relative loss below ``tol`` = success; none of this looks at the true input).

    Args:
        max_iterations: L-BFGS steps per trial.
        lr: L-BFGS learning rate.
        inner_iterations: Evaluations per L-BFGS step.
        history_size: L-BFGS memory.
        line_search: Strong-Wolfe line search.
        restarts: Maximum number of trials.
        init: ``"uniform"`` (in ``box``) or ``"randn"``.
        box: Valid input range, or ``None``.
        tol: Relative matching loss (``loss / ||g*||^2``) that counts as converged.
        max_seconds: Wall-time bound for the whole attack, or ``None``.

    Example:
        >>> import torch
        >>> from lightning_privacy.functional.attacks import observed_gradients_of
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Sigmoid(),
        ...                           torch.nn.Linear(6, 3))
        >>> x = torch.rand(1, 4)
        >>> g = observed_gradients_of(net, x, torch.tensor([2]))
        >>> rec = DeepLeakage(max_iterations=50).reconstruct(
        ...     net, g, input_shape=(4,), num_samples=1, generator=torch.Generator().manual_seed(0))
        >>> bool((rec.inputs - x).abs().max() < 1e-2), rec.metadata["labels_known"]
        (True, False)
    """

    max_iterations: int = 300
    lr: float = 1.0
    inner_iterations: int = 20
    history_size: int = 100
    line_search: bool = True
    restarts: int = 4
    init: str = "uniform"
    box: tuple[float, float] | None = (0.0, 1.0)
    tol: float = 1e-8
    max_seconds: float | None = None

    label_strategy = "joint"
    function = staticmethod(deep_leakage)

    def options(self) -> dict[str, Any]:
        """The dataclass fields plus the label strategy of this variant."""
        return {**super().options(), "label_strategy": self.label_strategy}

    def __post_init__(self) -> None:
        check_int("max_iterations", self.max_iterations, low=1)
        check_float("lr", self.lr, low=0.0, low_open=True)
        check_int("inner_iterations", self.inner_iterations, low=1)
        check_int("history_size", self.history_size, low=1)
        check_int("restarts", self.restarts, low=1)
        check_choice("init", self.init, INITS)
        check_choice("line_search", self.line_search, (True, False))
        check_float("tol", self.tol, low=0.0)
        if self.max_seconds is not None:
            check_float("max_seconds", self.max_seconds, low=0.0, low_open=True)
        _check_box(self.box)

    @classmethod
    def original(cls) -> DeepLeakage:
        """The paper's exact setting: randn start, no line search, one trial, no box."""
        return cls(line_search=False, restarts=1, init="randn", box=None, tol=0.0)


@ATTACKS.register("idlg")
@dataclass(frozen=True)
class IDLG(DeepLeakage):
    """Improved DLG (Zhao, Mopuri, Bilen, arXiv 2001.02610): label first, then DLG on inputs.

    The label is read off the last linear layer's gradient (the only row with a negative sum
    for one sample; the most negative row minima for a batch, Yin et al. 2021), then only the
    inputs are optimised with the same L2 objective. Paper preset as :class:`DeepLeakage`.

    Example:
        >>> import torch
        >>> from lightning_privacy.functional.attacks import observed_gradients_of
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Sigmoid(),
        ...                           torch.nn.Linear(6, 5))
        >>> g = observed_gradients_of(net, torch.rand(1, 4), torch.tensor([3]))
        >>> IDLG(max_iterations=2).reconstruct(net, g, input_shape=(4,), num_samples=1).labels
        tensor([3])
    """

    label_strategy = "idlg"
