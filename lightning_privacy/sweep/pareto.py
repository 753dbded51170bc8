"""Privacy-utility Pareto fronts and their plots (matplotlib, Agg backend).

A configuration is on the front when no other one has both higher validation accuracy and less
leakage (lower attack PSNR, lower membership-inference AUC, or lower ε). :func:`pareto_figure`
draws a plot in memory (the report embeds it); :func:`epsilon_audit_figure` sets the
accountant's ε beside the ε the membership audit proves; :func:`write_pareto_plots` writes the
PNG files of a sweep (the runner calls it).

Example:
    >>> pareto_front([(30.0, 0.9), (20.0, 0.8), (25.0, 0.7), (10.0, 0.5)])
    [3, 1, 0]
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_privacy.sweep.results import write_atomic

#: Pareto plots a sweep writes: file name, x key, x label, log scale.
PARETO_PLOTS = (
    ("pareto_attack_psnr.png", "attack_psnr", "attack PSNR (dB, lower = less leakage)", False),
    ("pareto_predicted_psnr.png", "predicted_psnr", "I²F predicted PSNR (dB)", False),
    ("pareto_mia_auc.png", "mia_auc", "MIA AUC (0.5 = members look like non-members)", False),
    ("pareto_epsilon.png", "epsilon", "ε (log scale, lower = stronger guarantee)", True),
)

#: The file of :func:`epsilon_audit_figure` in a sweep's directory.
EPSILON_AUDIT_PLOT = "epsilon_audit.png"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(leakage, accuracy)`` that no other point dominates.

    Lower leakage and higher accuracy are better. The result is sorted by leakage.

    Example:
        >>> pareto_front([(1.0, 0.5), (1.0, 0.6)])
        [1]
    """
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def defense_colours(results: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, ...]]:
    """One tab10 colour per defense, in order of first appearance among *all* trials.

    Taken before any trial is dropped for a missing measurement, so a defense keeps its colour
    in every panel of a report.

    Example:
        >>> rows = [{"defense": "none"}, {"defense": "dp_sgd"}, {"defense": "none"}]
        >>> list(defense_colours(rows)) == ["none", "dp_sgd"]
        True
    """
    import matplotlib

    names = dict.fromkeys(str(row.get("defense", "")) for row in results)
    tab10 = matplotlib.colormaps["tab10"]
    return {name: tuple(tab10(i % 10)) for i, name in enumerate(names)}


def agg_pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed).

    Example:
        >>> agg_pyplot().get_backend().lower()
        'agg'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed.

    Example:
        >>> fig, _ = agg_pyplot().subplots(figsize=(1, 1))
        >>> figure_png(fig)[1:4]
        b'PNG'
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    agg_pyplot().close(fig)
    return buffer.getvalue()


def _plotted_points(
    results: Sequence[Mapping[str, Any]], x_key: str, log_x: bool
) -> tuple[list[tuple[float, float]], list[Mapping[str, Any]], list[str]]:
    """The ``(x, val_acc)`` points, their rows, and the labels of the rows that cannot be drawn."""
    points, rows, skipped = [], [], []
    for row in results:
        x, y = _number(row.get(x_key)), _number(row.get("val_acc"))
        if x is None or y is None or (log_x and x <= 0):
            skipped.append(str(row.get("label", row.get("trial_id", "?"))))
            continue
        points.append((x, y))
        rows.append(row)
    return points, rows, skipped


def pareto_figure(
    results: Sequence[Mapping[str, Any]],
    x_key: str,
    x_label: str,
    *,
    log_x: bool = False,
    title: str | None = None,
) -> Any:
    """Scatter ``val_acc`` against ``x_key`` per trial, colour by defense, line through the front.

    Trials without a finite ``x_key`` (no attack run, ε undefined) are listed in the figure's
    note instead of being plotted.

    Example:
        >>> fig = pareto_figure([{"defense": "none", "val_acc": 0.9, "attack_psnr": 40.0}],
        ...                     "attack_psnr", "PSNR")
        >>> fig.axes[0].get_xlabel()
        'PSNR'
        >>> agg_pyplot().close(fig)
    """
    points, rows, skipped = _plotted_points(results, x_key, log_x)
    fig, ax = agg_pyplot().subplots(figsize=(5.6, 4.0), dpi=80)
    colours = defense_colours(results)
    defenses = [str(row.get("defense", "")) for row in rows]
    for (x, y), row, defense in zip(points, rows, defenses, strict=True):
        ax.scatter(x, y, color=colours[defense], s=36, zorder=3)
        ax.annotate(
            str(row.get("label", "")), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    for defense in dict.fromkeys(defenses):
        ax.scatter([], [], color=colours[defense], label=defense)
    if points:
        front = pareto_front(points)
        ax.plot(
            [points[i][0] for i in front],
            [points[i][1] for i in front],
            "k--",
            lw=1,
            label="Pareto front",
            zorder=2,
        )
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no trial has this measurement", ha="center", transform=ax.transAxes)
    if log_x and points:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation accuracy")
    ax.set_title(title or f"accuracy vs {x_key}", fontsize=10)
    if skipped:
        note = "not plotted (undefined): " + ", ".join(skipped)
        fig.text(0.01, 0.01, note[:140], fontsize=6, color="grey")
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def plot_pareto(
    results: Sequence[Mapping[str, Any]],
    x_key: str,
    x_label: str,
    path: str | Path,
    *,
    log_x: bool = False,
    title: str | None = None,
) -> Path:
    """Write :func:`pareto_figure` as a PNG file, even when nothing can be plotted.

    Example:
        >>> import tempfile, os
        >>> rows = [{"defense": "none", "label": "none", "val_acc": 0.9, "attack_psnr": 40.0},
        ...         {"defense": "gaussian_noise", "label": "gaussian_noise=0.1",
        ...          "val_acc": 0.7, "attack_psnr": 12.0}]
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = plot_pareto(rows, "attack_psnr", "PSNR", os.path.join(d, "p.png"))
        ...     p.stat().st_size > 1000
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = pareto_figure(results, x_key, x_label, log_x=log_x, title=title)
    return write_atomic(path, figure_png(fig))


def _audit_points(
    results: Sequence[Mapping[str, Any]],
) -> tuple[list[tuple[float, float, str]], list[str]]:
    """``(accountant ε, audited ε, label)`` of the trials with both; notes for those without."""
    points, notes = [], []
    for row in results:
        label = str(row.get("label", row.get("trial_id", "?")))
        formal, audited = _number(row.get("epsilon")), _number(row.get("audited_epsilon"))
        if audited is None:
            continue
        if formal is None or formal <= 0:
            notes.append(f"{label}: audited ε ≥ {audited:.2g}, no formal ε")
        else:
            points.append((formal, audited, label))
    return points, notes


def epsilon_audit_figure(results: Sequence[Mapping[str, Any]]) -> Any:
    """Audited ε (membership audit, a lower bound) against the accountant's ε, one point a trial.

    A correct accountant keeps every point on or below the diagonal ``y = x`` (up to the 5 % the
    bound's confidence allows). Trials with an audited ε
    but no finite formal one (no defense, a defense without a guarantee) are listed in the note.

    Example:
        >>> rows = [{"label": "dpsgd=1", "epsilon": 3.0, "audited_epsilon": 0.4},
        ...         {"label": "none", "epsilon": float("inf"), "audited_epsilon": 1.2}]
        >>> fig = epsilon_audit_figure(rows)
        >>> fig.axes[0].get_xlabel(), len(fig.texts)
        ("accountant's ε (log scale)", 1)
        >>> agg_pyplot().close(fig)
    """
    points, notes = _audit_points(results)
    fig, ax = agg_pyplot().subplots(figsize=(5.6, 4.0), dpi=80)
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.scatter(xs, ys, color="tab:blue", s=36, zorder=3)
        for x, y, label in points:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        low, high = min(xs) / 2, max(*xs, *ys) * 2
        diagonal = [low * (high / low) ** (i / 99) for i in range(100)]  # y = x on a log x axis
        ax.plot(diagonal, diagonal, "k--", lw=1, label="audited = accountant's ε")
        ax.set_xlim(low, high)
        ax.set_xscale("log")
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no trial has both ε", ha="center", transform=ax.transAxes)
    ax.set_xlabel("accountant's ε (log scale)")
    ax.set_ylabel("audited ε (lower bound, 95 %)")
    ax.set_title("accountant ε vs audited ε", fontsize=10)
    if notes:
        fig.text(0.01, 0.01, "; ".join(notes)[:160], fontsize=6, color="grey")
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def write_pareto_plots(results: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write every plot of :data:`PARETO_PLOTS` and :data:`EPSILON_AUDIT_PLOT` into ``out_dir``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     [p.name for p in write_pareto_plots([], d)][::4]
        ['pareto_attack_psnr.png', 'epsilon_audit.png']
    """
    written = [
        plot_pareto(results, key, label, Path(out_dir) / name, log_x=log_x)
        for name, key, label, log_x in PARETO_PLOTS
    ]
    audit = figure_png(epsilon_audit_figure(results))
    return [*written, write_atomic(Path(out_dir) / EPSILON_AUDIT_PLOT, audit)]
