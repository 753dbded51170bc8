"""A self-contained HTML report of a run directory (sweep or demo): one file, images inline.

Sections: the results table, the privacy-utility Pareto fronts (accuracy against attack PSNR,
I²F predicted PSNR, membership-inference AUC and ε; the accountant's ε against the audited one),
leakage over training (attack PSNR, I²F predicted PSNR, MIA AUC, ε and accuracy against the
optimizer step), the reconstruction grids the
audit produced, and the threat model each number was measured under.

Rendering reads the run directory and writes nothing but ``report.html``: the figures are drawn
in memory and embedded; the sweep writes its Pareto PNG files itself. Results are
:class:`~lightning_privacy.sweep.results.TrialResult` objects or their ``result.json`` dicts.

Example:
    >>> import os, tempfile
    >>> rows = [{"trial_id": "none", "label": "none", "defense": "none", "val_acc": 0.9,
    ...          "attack_psnr": 35.0, "status": "ok",
    ...          "history": {"attack/psnr": [[10, 30.0], [20, 35.0]]}}]
    >>> with tempfile.TemporaryDirectory() as d:
    ...     html = write_report(d, results=rows).read_text()
    ...     os.listdir(d)
    ['report.html']
    >>> "<img" in html and "data:image/png;base64," in html and "http" not in html.split("<body")[0]
    True
"""

from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_privacy.sweep.pareto import (
    PARETO_PLOTS,
    agg_pyplot,
    epsilon_audit_figure,
    figure_png,
    pareto_figure,
)
from lightning_privacy.sweep.results import (
    RunScan,
    TrialResult,
    as_result,
    load_sweep_record,
    scan_run,
    write_atomic,
)

#: Scalars plotted against the step, when any trial logged them.
CURVES = (
    ("attack/psnr", "attack PSNR (dB)"),
    ("leakage/predicted_psnr", "I²F predicted PSNR (dB)"),
    ("leakage/i2f", "I²F (input-space L2 error)"),
    ("membership/auc", "membership-inference AUC"),
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


def curve_figures(results: Iterable[TrialResult | Mapping[str, Any]]) -> list[tuple[str, bytes]]:
    """One PNG per logged curve of :data:`CURVES`: the metric against the step, a line per trial.

    Example:
        >>> row = {"trial_id": "a", "history": {"val/acc": [[1, 0.5], [2, 0.7]]}}
        >>> [name for name, _ in curve_figures([row])]
        ['validation accuracy']
    """
    rows = [as_result(r) for r in results]
    figures = []
    for key, label in CURVES:
        series = [(r.label, r.history[key]) for r in rows if r.history.get(key)]
        if not series:
            continue
        fig, ax = agg_pyplot().subplots(figsize=(5.2, 3.4), dpi=80)
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
        figures.append((label, figure_png(fig)))
    return figures


def pareto_images(results: Iterable[TrialResult | Mapping[str, Any]]) -> list[tuple[str, bytes]]:
    """The Pareto plots of :data:`~lightning_privacy.sweep.pareto.PARETO_PLOTS` as PNG bytes.

    Only the finished trials are drawn, and only the plots some of them have a value for; with an
    audited ε, the accountant-vs-audited panel follows. Nothing is written.

    Example:
        >>> row = {"trial_id": "a", "defense": "none", "val_acc": 0.9, "attack_psnr": 30.0}
        >>> [caption for caption, _ in pareto_images([row])]
        ['accuracy vs attack PSNR (dB, lower = less leakage)']
    """
    ok = [r.to_dict() for r in map(as_result, results) if r.ok]
    figures = [
        (f"accuracy vs {label}", figure_png(pareto_figure(ok, key, label, log_x=log_x)))
        for _, key, label, log_x in PARETO_PLOTS
        if any(row[key] is not None for row in ok)
    ]
    if any(row["audited_epsilon"] is not None for row in ok):
        caption = "accountant ε vs audited ε (membership audit)"
        figures.append((caption, figure_png(epsilon_audit_figure(ok))))
    return figures


def _reconstruction_images(
    run_dir: Path, results: Sequence[TrialResult], per_trial: int
) -> list[tuple[str, str]]:
    figures = []
    for result in results:
        names = [n for n in result.images if Path(n).suffix.lower() in _MIME]
        for name in names[-per_trial:]:
            path = run_dir / "trials" / result.trial_id / name
            if path.is_file():
                caption = f"{result.label}: {Path(name).stem}"
                figures.append((caption, data_uri(path.read_bytes(), _MIME[path.suffix.lower()])))
    return figures


#: The results table: TrialResult attribute (``guarantee`` is the ε column) and heading.
_COLUMNS = (
    ("label", "configuration"),
    ("val_acc", "val acc"),
    ("guarantee", "ε"),
    ("attack_psnr", "attack PSNR (dB)"),
    ("attack_ssim", "attack SSIM"),
    ("predicted_psnr", "predicted PSNR (dB)"),
    ("mia_auc", "MIA AUC"),
    ("mia_tpr_at_1pct_fpr", "MIA TPR @ 1 % FPR"),
    ("audited_epsilon", "audited ε"),
    ("seconds", "time (s)"),
    ("status", "status"),
)


def _table(results: Sequence[TrialResult]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in _COLUMNS)
    rows = [
        "<tr>" + "".join(f"<td>{_fmt(getattr(r, key))}</td>" for key, _ in _COLUMNS) + "</tr>"
        for r in results
    ]
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _threat_table(results: Sequence[TrialResult]) -> str:
    keys = list(dict.fromkeys(k for r in results for k in r.threat_model))
    if not keys:
        return ""
    head = "<th>configuration</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    rows = []
    for r in results:
        cells = "".join(f"<td>{_fmt(r.threat_model.get(k))}</td>" for k in keys)
        rows.append(f"<tr><td>{_fmt(r.label)}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _scan_notes(scan: RunScan | None, *, include_stale: bool) -> list[str]:
    """Paragraphs naming the result files left out (invalid) and the hidden stale trials."""
    if scan is None:
        return []
    notes = [
        f"<p class='note'><b>Not a valid result, not shown:</b> <code>{html.escape(str(e.path))}"
        f"</code>: {html.escape(e.reason)}.</p>"
        for e in scan.invalid
    ]
    if scan.stale and not include_stale:
        notes.append(
            f"<p class='note'>{len(scan.stale)} trial(s) of an earlier configuration of this "
            "run directory are not shown (<code>lightning-privacy report --all RUN_DIR</code> "
            "shows them).</p>"
        )
    return notes


def _results_section(run_dir: Path, results: Sequence[TrialResult]) -> list[str]:
    """The table, what its columns mean, the warnings and the failed trials."""
    parts = [
        f"<p class='note'>Run directory <code>{html.escape(str(run_dir))}</code>, "
        f"{len(results)} configuration(s), generated {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>",
        "<h2>Results</h2>",
        _table(results),
        "<p class='note'>Attack PSNR: the audit's reconstruction of a held-out batch from the "
        "defended gradient at the end of training (higher = more leakage). Predicted PSNR: the "
        "I²F estimate for the same batch and defense. ε: formal (ε, δ)-DP where a mechanism "
        "provides it, ∞ without a defense. MIA AUC and TPR: the membership audit's attack "
        "telling training examples from validation ones (AUC 0.5 = no better than chance); "
        "audited ε: the ε those scores prove at 95 % confidence, a lower bound that a correct "
        "accountant's ε falls below at most 5 % of the time.</p>",
    ]
    notes = sorted({w for r in results for w in r.warnings})
    if notes:
        parts.append("<details><summary class='note'>Warnings during training</summary><ul>")
        parts.extend(f"<li class='note'>{html.escape(w)}</li>" for w in notes)
        parts.append("</ul></details>")
    parts.extend(
        f"<p class='note'>{_fmt(r.label)}: {_fmt(r.status)}</p>" for r in results if not r.ok
    )
    return parts


def _figure_section(heading: str, figures: Sequence[tuple[str, str]], *, css: str = "") -> str:
    """A heading and a grid of captioned images (``data:`` URIs); ``""`` without figures."""
    if not figures:
        return ""
    image_class = f" class='{css}'" if css else ""
    items = "".join(
        f"<figure><img{image_class} alt='{html.escape(caption)}' src='{uri}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, uri in figures
    )
    return f"{heading}<div class='grid'>{items}</div>"


def _png_uris(figures: Sequence[tuple[str, bytes]]) -> list[tuple[str, str]]:
    return [(caption, data_uri(payload)) for caption, payload in figures]


def _setup_section(run_dir: Path) -> str:
    """The sweep's shared settings and grid from ``sweep.json`` as YAML, or ``""``."""
    import yaml

    record = load_sweep_record(run_dir)
    shown = {k: record[k] for k in ("defenses", "settings", "backend", "workers") if k in record}
    if not shown:
        return ""
    setup = yaml.safe_dump(shown, sort_keys=False, allow_unicode=True)
    return f"<h2>Setup</h2><pre>{html.escape(setup)}</pre>"


def render_report(
    run_dir: str | Path,
    results: Iterable[TrialResult | Mapping[str, Any]],
    *,
    title: str = "lightning-privacy report",
    images_per_trial: int = 1,
    notes: Sequence[str] = (),
) -> str:
    """The report as one HTML string (every image a base64 ``data:`` URI; no external files).

    ``notes`` are HTML paragraphs shown under the results table (the files left out).

    Example:
        >>> row = {"trial_id": "g", "label": "g", "defense": "gaussian_noise", "val_acc": 0.8}
        >>> page = render_report(".", [row], title="t")
        >>> page.startswith("<!DOCTYPE html>"), "no formal DP" in page
        (True, True)
    """
    run_dir = Path(run_dir)
    rows = [as_result(r) for r in results]
    reconstructions = _figure_section(
        "<h2>Reconstructions</h2><p class='note'>Held-out images (truth) next to what the "
        "simulated attacker rebuilt from the defended gradient.</p>",
        _reconstruction_images(run_dir, rows, images_per_trial),
        css="recon",
    )
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *_results_section(run_dir, rows),
        *notes,
        reconstructions,
        _figure_section("<h2>Privacy-utility Pareto front</h2>", _png_uris(pareto_images(rows))),
        _figure_section("<h2>Leakage over training</h2>", _png_uris(curve_figures(rows))),
        f"<h2>Threat model</h2><p>{THREAT_MODEL}</p>",
        _threat_table(rows),
        _setup_section(run_dir),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part)


#: The membership report's table: audit key and heading (rates in per cent).
_MEMBERSHIP_COLUMNS = (
    ("auc", "AUC"),
    ("auc_interval", "95 % CI"),
    ("tpr_at_fpr_0.01", "TPR @ 1 % FPR (%)"),
    ("tpr_at_fpr_0.001", "TPR @ 0.1 % FPR (%)"),
    ("advantage", "advantage"),
    ("epsilon_lower_bound", "ε lower bound"),
)


def _membership_cells(row: Mapping[str, Any]) -> list[str]:
    def pct(value: Any) -> Any:
        return None if value is None or value != value else 100 * float(value)

    values = {
        **row,
        "auc_interval": f"[{_fmt(row.get('auc_low'))}, {_fmt(row.get('auc_high'))}]",
        "tpr_at_fpr_0.01": pct(row.get("tpr_at_fpr_0.01")),
        "tpr_at_fpr_0.001": pct(row.get("tpr_at_fpr_0.001")),
    }
    return [_fmt(values.get(key)) for key, _ in _MEMBERSHIP_COLUMNS]


def render_membership_report(audit: Mapping[str, Any], roc_png: bytes) -> str:
    """The HTML report of ``lightning-privacy audit membership``: target, table, ROC inline.

    Example:
        >>> audit = {"name": "a", "reference_models": 2, "members": 10, "nonmembers": 10,
        ...          "delta": 1e-5, "target": {"train_acc": 1.0, "test_acc": 0.6},
        ...          "attacks": {"loss": {"auc": 0.7, "auc_low": 0.6, "auc_high": 0.8,
        ...                               "tpr_at_fpr_0.01": 0.1, "tpr_at_fpr_0.001": float("nan"),
        ...                               "advantage": 0.3, "epsilon_lower_bound": 1.2}}}
        >>> page = render_membership_report(audit, b"png")
        >>> "<td>loss</td><td>0.7</td><td>[0.6, 0.8]</td><td>10</td><td>—</td>" in page
        True
    """
    target = audit.get("target") or {}
    head = "<th>attack</th>" + "".join(f"<th>{html.escape(t)}</th>" for _, t in _MEMBERSHIP_COLUMNS)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{cell}</td>" for cell in _membership_cells(row))
        + "</tr>"
        for name, row in audit["attacks"].items()
    )
    title = f"Membership audit: {audit['name']}"
    facts = (
        f"target train acc {_fmt(target.get('train_acc'))}, test acc "
        f"{_fmt(target.get('test_acc'))}, ε {_fmt(target.get('epsilon'))}; "
        f"{audit['members']} members, {audit['nonmembers']} non-members, "
        f"{audit['reference_models']} reference models, δ {_fmt(audit.get('delta'))}"
    )
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='note'>{html.escape(facts)}</p>",
        f"<table><tr>{head}</tr>{rows}</table>",
        "<p class='note'>TPR at an FPR the non-members cannot resolve (fewer than 1/FPR) is "
        "shown as —. The ε lower bound uses one-sided Clopper-Pearson bounds on both rates "
        "at 95 %.</p>",
        _figure_section("<h2>ROC (log-log)</h2>", [("ROC of every attack", data_uri(roc_png))]),
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(
    run_dir: str | Path,
    *,
    results: Iterable[TrialResult | Mapping[str, Any]] | None = None,
    title: str | None = None,
    path: str | Path | None = None,
    include_stale: bool = False,
) -> Path:
    """Write ``report.html`` for ``run_dir`` (results read from it unless given) and return it.

    Nothing else is written: the figures are embedded, drawn in memory. Read from the
    directory, the results are those of its current configuration (``include_stale`` adds the
    trials an earlier configuration left); a ``result.json`` that is not a valid result is named
    in the report instead of being dropped silently.

    Raises:
        FileNotFoundError: If ``run_dir`` does not exist.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     write_report(d, results=[], title="empty").name
        'report.html'
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run directory {str(run_dir)!r} does not exist.")
    scan = scan_run(run_dir)
    if results is None:
        results = [*scan.results, *(scan.stale if include_stale else ())]
    if title is None:
        title = str(load_sweep_record(run_dir).get("title", "lightning-privacy report"))
    target = Path(path) if path is not None else run_dir / "report.html"
    notes = _scan_notes(scan, include_stale=include_stale)
    return write_atomic(target, render_report(run_dir, results, title=title, notes=notes))
