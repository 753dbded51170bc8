"""ROC curves of membership attacks on log-log axes (the convention since LiRA), as images.

Matplotlib's object API on an Agg canvas (no ``pyplot`` state, no display, nothing written):
:func:`roc_figure` for the report and the examples, :func:`roc_image` for the loggers.

Example:
    >>> curves = {"loss": ([0.0, 0.1, 1.0], [0.0, 0.5, 1.0])}
    >>> image = roc_image(curves, title="step 10")
    >>> image.shape[0], float(image.min()) >= 0.0, float(image.max()) <= 1.0
    (3, True, True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["roc_figure", "roc_image"]

Curve = tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]


def roc_figure(curves: Mapping[str, Curve], *, title: str = "", floor: float | None = None) -> Any:
    """A matplotlib ``Figure``: one log-log ROC per attack, and the chance diagonal.

    Args:
        curves: ``{label: (fpr, tpr)}``.
        title: The axes' title.
        floor: The lowest rate shown (default: the smallest non-zero FPR of the curves, at most
            1e-3), so zero rates sit on the axis instead of vanishing.

    Example:
        >>> fig = roc_figure({"a": ([0.0, 0.5, 1.0], [0.0, 0.7, 1.0])})
        >>> fig.axes[0].get_xscale(), fig.axes[0].get_yscale()
        ('log', 'log')
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    positive = [
        float(np.min(np.asarray(fpr)[np.asarray(fpr) > 0]))
        for fpr, _ in curves.values()
        if np.any(np.asarray(fpr) > 0)
    ]
    low = floor if floor is not None else min([1e-3, *positive])
    fig = Figure(figsize=(4.2, 4.0), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([low, 1], [low, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    for label, (fpr, tpr) in curves.items():
        ax.plot(np.clip(fpr, low, 1), np.clip(tpr, low, 1), linewidth=1.5, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, 1)
    ax.set_ylim(low, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.subplots_adjust(left=0.17, right=0.97, bottom=0.13, top=0.92)
    return fig


def roc_image(curves: Mapping[str, Curve], *, title: str = "") -> Tensor:
    """:func:`roc_figure` rendered as a ``(3, H, W)`` float tensor in ``[0, 1]``."""
    fig = roc_figure(curves, title=title)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
