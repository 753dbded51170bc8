"""A self-contained HTML report of a run directory (sweep or demo): one file, images inline.

Sections: the results table, the privacy-utility Pareto fronts, leakage over training (attack
PSNR, I²F predicted PSNR, ε and accuracy against the optimizer step), the reconstruction grids the
audit produced, and the threat model each number was measured under.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> rows = [{"trial_id": "none", "label": "none", "defense": "none", "val_acc": 0.9,
    ...          "attack_psnr": 35.0, "status": "ok",
    ...          "history": {"attack/psnr": [[10, 30.0], [20, 35.0]]}}]
    >>> with tempfile.TemporaryDirectory() as d:
    ...     html = write_report(d, results=rows).read_text()
    >>> "<img" in html and "data:image/png;base64," in html and "http" not in html.split("<body")[0]
    True
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Scalars plotted against the step, when any trial logged them.
CURVES = (
    ("attack/psnr", "attack PSNR (dB)"),
    ("leakage/predicted_psnr", "I²F predicted PSNR (dB)"),
    ("leakage/i2f", "I²F (input-space L2 error)"),
    ("privacy/epsilon", "ε"),
    ("val/acc", "validation accuracy"),
    ("train/loss", "training loss"),
)
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

THREAT_MODEL = (
    "The attacker is an honest-but-curious server (or any party on the wire) that sees the "
    "gradient of one batch leaving a training process, after the defenses of the Trainer's "
    "<code>GradientDefense</code> (under DDP with <code>placement='local'</code>: the per-rank "
    "gradient before the all-reduce; with <code>'aggregate'</code>: the averaged one). It knows "
    "the architecture and the current weights, and tries to rebuild the batch by gradient "
    "matching (DLG, Inverting Gradients) or analytically. <code>InversionAudit</code> simulates "
    "that attacker on a held-out batch with its own random generator, so the reported PSNR is an "
    "empirical measurement of one attack, not a bound; <code>LeakageMonitor</code>'s I²F is a "
    "first-order estimate of what a perfect attacker could reconstruct under the same defense; "
    "only DP-SGD (per-example clipping + Gaussian noise, Opacus accountant) and clipping + "
    "Gaussian noise on the batch gradient (batch-clipping accountant) give a formal guarantee "
    "ε(δ). Noise without clipping, pruning and low-rank filtering give none."
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:1em}.grid figure{margin:0}figcaption{font-size:.8em;
color:#555}img{max-width:100%}img.recon{min-width:150px;image-rendering:pixelated}.note{color:#666;font-size:.85em}code{background:#f5f5f5}
"""


def data_uri(payload: bytes, mime: str = "image/png") -> str:
    """Base64 ``data:`` URI of an image.

    Example:
        >>> data_uri(b"abc")
        'data:image/png;base64,YWJj'
    """
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _figure_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return html.escape(str(value))


def curve_figures(results: Sequence[Mapping[str, Any]]) -> list[tuple[str, bytes]]:
    """One PNG per logged curve of :data:`CURVES`: the metric against the step, a line per trial.

    Example:
        >>> figs = curve_figures([{"label": "a", "history": {"val/acc": [[1, 0.5], [2, 0.7]]}}])
        >>> [name for name, _ in figs]
        ['validation accuracy']
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    for key, label in CURVES:
        series = [
            (str(r.get("label", r.get("trial_id"))), r["history"][key])
            for r in results
            if isinstance(r.get("history"), Mapping) and r["history"].get(key)
        ]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=80)
        for name, points in series:
            steps = [p[0] for p in points]
            values = [p[1] for p in points]
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, ms=3, label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.tight_layout()
        figures.append((label, _figure_png(fig)))
    return figures


def _pareto_images(run_dir: Path, results: Sequence[Mapping[str, Any]]) -> list[tuple[str, bytes]]:
    from lightning_privacy.sweep.pareto import PARETO_PLOTS, plot_pareto

    images = []
    ok = [r for r in results if r.get("status", "ok") == "ok"]
    for name, key, label, log_x in PARETO_PLOTS:
        path = run_dir / name
        if not any(r.get(key) not in (None, "") for r in ok):
            continue
        plot_pareto(ok, key, label, path, log_x=log_x)  # (re)drawn from the current results
        images.append((f"accuracy vs {label}", path.read_bytes()))
    return images


def _reconstruction_images(
    run_dir: Path, results: Sequence[Mapping[str, Any]], per_trial: int
) -> list[tuple[str, str]]:
    figures = []
    for result in results:
        trial_dir = run_dir / "trials" / str(result.get("trial_id", ""))
        names = [n for n in result.get("images", []) if Path(n).suffix.lower() in _MIME]
        for name in names[-per_trial:]:
            path = trial_dir / name
            if path.is_file():
                caption = f"{result.get('label', result.get('trial_id'))}: {Path(name).stem}"
                figures.append((caption, data_uri(path.read_bytes(), _MIME[path.suffix.lower()])))
    return figures


def _table(results: Sequence[Mapping[str, Any]]) -> str:
    columns = (
        ("label", "configuration"),
        ("val_acc", "val acc"),
        ("epsilon", "ε"),
        ("attack_psnr", "attack PSNR (dB)"),
        ("attack_ssim", "attack SSIM"),
        ("predicted_psnr", "predicted PSNR (dB)"),
        ("seconds", "time (s)"),
        ("status", "status"),
    )
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    rows = []
    for r in results:
        cells = []
        for key, _ in columns:
            value = r.get(key)
            if key == "epsilon" and value is None and r.get("status", "ok") == "ok":
                value = "no formal guarantee" if r.get("defense") not in ("none", None) else None
            if key == "label" and value is None:
                value = r.get("trial_id")
            cells.append(f"<td>{_fmt(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _threat_table(results: Sequence[Mapping[str, Any]]) -> str:
    keys: list[str] = []
    for r in results:
        for k in r.get("threat_model") or {}:
            if k not in keys:
                keys.append(k)
    if not keys:
        return ""
    head = "<th>configuration</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = []
    for r in results:
        tm = r.get("threat_model") or {}
        cells = "".join(f"<td>{_fmt(tm.get(k))}</td>" for k in keys)
        rows.append(f"<tr><td>{_fmt(r.get('label', r.get('trial_id')))}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render_report(
    run_dir: str | Path,
    results: Sequence[Mapping[str, Any]],
    *,
    title: str = "lightning-privacy report",
    images_per_trial: int = 1,
) -> str:
    """The report as one HTML string (every image a base64 ``data:`` URI; no external files)."""
    run_dir = Path(run_dir)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>Run directory <code>{html.escape(str(run_dir))}</code>, "
        f"{len(results)} configuration(s), generated {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>",
        "<h2>Results</h2>",
        _table(results),
        "<p class='note'>Attack PSNR: the audit's reconstruction of a held-out batch from the "
        "defended gradient at the end of training (higher = more leakage). Predicted PSNR: the "
        "I²F estimate for the same batch and defense. ε: formal (ε, δ)-DP where a mechanism "
        "provides it, ∞ without a defense.</p>",
    ]
    missing = sorted({m for r in results for m in r.get("missing", [])})
    if missing:
        parts.append(
            "<p class='note'>Not measured in this run (component not available): "
            + html.escape(", ".join(missing))
            + ".</p>"
        )
    notes = sorted({w for r in results for w in r.get("warnings", [])})
    if notes:
        parts.append("<details><summary class='note'>Warnings during training</summary><ul>")
        parts.extend(f"<li class='note'>{html.escape(w)}</li>" for w in notes)
        parts.append("</ul></details>")
    failed = [r for r in results if str(r.get("status", "ok")).startswith("failed")]
    for r in failed:
        parts.append(f"<p class='note'>{_fmt(r.get('label'))}: {_fmt(r.get('status'))}</p>")
    grids = _reconstruction_images(run_dir, results, images_per_trial)
    if grids:
        parts.append(
            "<h2>Reconstructions</h2><p class='note'>Held-out images (truth) next to what the "
            "simulated attacker rebuilt from the defended gradient.</p><div class='grid'>"
        )
        for caption, uri in grids:
            parts.append(
                f"<figure><img class='recon' alt='{html.escape(caption)}' src='{uri}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    pareto = _pareto_images(run_dir, results)
    if pareto:
        parts.append("<h2>Privacy-utility Pareto front</h2><div class='grid'>")
        for caption, payload in pareto:
            parts.append(
                f"<figure><img alt='{html.escape(caption)}' src='{data_uri(payload)}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    curves = curve_figures(results)
    if curves:
        parts.append("<h2>Leakage over training</h2><div class='grid'>")
        for caption, payload in curves:
            parts.append(
                f"<figure><img alt='{html.escape(caption)}' src='{data_uri(payload)}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append(f"<h2>Threat model</h2><p>{THREAT_MODEL}</p>")
    parts.append(_threat_table(results))
    setup = _stored_settings(run_dir)
    if setup:
        parts.append(f"<h2>Setup</h2><pre>{html.escape(setup)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _stored_settings(run_dir: Path) -> str:
    """The sweep's shared settings and grid from ``sweep.json`` as YAML, or ``""``."""
    import json

    import yaml

    try:
        stored = json.loads((run_dir / "sweep.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(stored, dict):
        return ""
    shown = {k: stored[k] for k in ("defenses", "settings", "backend", "workers") if k in stored}
    return yaml.safe_dump(shown, sort_keys=False, allow_unicode=True)


def _stored_title(run_dir: Path) -> str:
    """The title the sweep or demo recorded in ``sweep.json``, else a generic one."""
    import json

    try:
        return str(json.loads((run_dir / "sweep.json").read_text())["title"])
    except (OSError, ValueError, KeyError, TypeError):
        return "lightning-privacy report"


def write_report(
    run_dir: str | Path,
    *,
    results: Sequence[Mapping[str, Any]] | None = None,
    title: str | None = None,
    path: str | Path | None = None,
) -> Path:
    """Write ``report.html`` for ``run_dir`` (results read from it unless given) and return it.

    Raises:
        FileNotFoundError: If ``run_dir`` does not exist.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run directory {str(run_dir)!r} does not exist.")
    if results is None:
        from lightning_privacy.sweep.runner import load_results

        results = load_results(run_dir)
    if title is None:
        title = _stored_title(run_dir)
    target = Path(path) if path is not None else run_dir / "report.html"
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(render_report(run_dir, results, title=title), encoding="utf-8")
    tmp.replace(target)
    return target
