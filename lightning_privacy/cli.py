"""The ``lightning-privacy`` command line: ``demo``, ``sweep`` and ``report``.

* ``lightning-privacy demo`` -- what ``make demo`` runs: LeNet on the embedded digits, trained
  without a defense, with Gaussian noise, with magnitude pruning and with DP-SGD, each audited by
  ``InversionAudit`` and ``LeakageMonitor``; prints one table and writes a report.
* ``lightning-privacy sweep --config sweep.yaml [--backend local|ray] [--out DIR]`` -- a grid
  over defenses and strengths (:mod:`lightning_privacy.sweep`); ``results.csv``, Pareto plots
  and ``report.html`` in ``DIR``; rerunning it skips finished trials.
* ``lightning-privacy report RUN_DIR [--all]`` -- (re)write ``RUN_DIR/report.html`` (the trials of
  the current configuration; ``--all`` adds those an earlier one left); exits 1 when a result
  file is not a valid result (each one is named).

Invalid input (a bad sweep file, an unknown backend, Ray missing, no such run directory) prints
one line per problem naming the line and key and exits with code 2 before anything is written;
a sweep file is checked whole, every trial dry-run (:mod:`lightning_privacy.sweep.check`).

Example:
    >>> from lightning_privacy.cli import build_parser
    >>> build_parser().parse_args(["demo", "--epochs", "1"]).epochs
    1
    >>> main(["sweep", "--config", "/nonexistent.yaml"])
    2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # the sweep (torch, Lightning) is imported when a command needs it
    from lightning_privacy.sweep.results import TrialResult

#: Exit code of invalid input (as argparse uses), and of a run directory another sweep holds.
EXIT_USAGE = 2
#: Exit code after Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130

#: DP-SGD's own training settings in the demo. Per-example clipping and noise want a larger batch
#: (less noise per averaged gradient, fewer steps to account for) and a larger step than the
#: non-private runs (batch 64, Adam lr 0.003): with the shared settings DP-SGD reached 24 %.
DEMO_DPSGD_OVERRIDES: dict[str, dict[str, Any]] = {
    "model": {"lr": 0.03},
    "data": {"batch_size": 128},
}

DEMO_DEFENSES: tuple[dict[str, Any], ...] = (
    {"name": "none"},
    {"name": "gaussian_noise", "strengths": [0.01]},
    {"name": "magnitude_pruning", "strengths": [0.9]},
    {
        "name": "dpsgd",
        "strengths": [1.0],
        "max_grad_norm": 0.5,
        "overrides": DEMO_DPSGD_OVERRIDES,
    },
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the console script.

    Example:
        >>> build_parser().parse_args(["sweep", "--config", "s.yaml", "--backend", "ray"]).backend
        'ray'
    """
    parser = argparse.ArgumentParser(
        prog="lightning-privacy",
        description="Privacy audits of PyTorch Lightning training: demo, sweep, report.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on embedded digits with and without defenses")
    demo.add_argument("--epochs", type=int, default=10, help="training epochs per configuration")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--dataset", default="digits", choices=("digits", "lfw"))
    demo.add_argument("--out", default=None, help="run directory (default runs/demo-<time>)")
    demo.add_argument("--quick", action="store_true", help="smoke run: 1 short epoch, small audits")
    sweep = sub.add_parser("sweep", help="privacy-utility grid over defenses and strengths")
    sweep.add_argument("--config", required=True, help="sweep YAML file")
    sweep.add_argument("--backend", default=None, help="local (default) or ray")
    sweep.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    sweep.add_argument("--workers", type=int, default=None, help="concurrent trials")
    report = sub.add_parser("report", help="write the HTML report of a run directory")
    report.add_argument("run_dir", help="a sweep or demo run directory")
    report.add_argument("--out", default=None, help="HTML file (default RUN_DIR/report.html)")
    report.add_argument(
        "--all", action="store_true", help="also the trials an earlier configuration left"
    )
    return parser


def demo_config_text(
    *, epochs: int, seed: int, dataset: str = "digits", quick: bool = False, image_size: int = 16
) -> str:
    """The sweep configuration of the demo, as YAML.

    DP-SGD trains with its own settings (:data:`DEMO_DPSGD_OVERRIDES`, clipping norm 0.5); the
    other configurations share the non-private ones.

    Example:
        >>> from lightning_privacy.sweep import parse_sweep_config
        >>> trials = parse_sweep_config(demo_config_text(epochs=1, seed=0)).trials()
        >>> [t.label for t in trials]
        ['none', 'gaussian_noise=0.01', 'magnitude_pruning=0.9', 'dpsgd=1']
        >>> [(t.settings["model"]["lr"], t.settings["data"]["batch_size"]) for t in trials]
        [(0.003, 64), (0.003, 64), (0.003, 64), (0.03, 128)]
    """
    import copy

    import yaml

    config = {
        "name": "demo",
        "defenses": [copy.deepcopy(d) for d in DEMO_DEFENSES],
        "data": {"dataset": dataset, "image_size": image_size, "batch_size": 64},
        "model": {"name": "lenet", "optimizer": "adam", "lr": 0.003, "init": "uniform"},
        "training": {
            "epochs": 1 if quick else epochs,
            "seed": seed,
            "limit_train_batches": 3 if quick else None,
        },
        "audit": {
            "attack": "deep_leakage",
            "num_samples": 1,
            "every_n_epochs": 1 if quick else epochs,
            "max_seconds": 30.0,
            "options": {"max_iterations": 5} if quick else {},
        },
        "leakage": {
            "estimator": "exact",
            "num_samples": 1,
            "num_delta_samples": 1,
            "every_n_epochs": 1 if quick else max(1, epochs // 5),
        },
        "membership": {"attack": "loss", "num_samples": 200, "every_n_epochs": 1},
    }
    return yaml.safe_dump(config, sort_keys=False)


def _label_cell(result: TrialResult) -> Text:
    """The configuration's label, plus the settings it overrides (dim, on a second line)."""
    cell = Text(result.label)
    if result.overrides:
        short = ", ".join(item.split(".", 1)[-1] for item in result.overrides.split(", "))
        cell.append(f"\n  {short}", style="dim")
    return cell


def _cell(value: Any, fmt: str) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, str):  # a note such as NO_FORMAL_DP
        return value
    number = float(value)
    return "∞" if math.isinf(number) else format(number, fmt)


_TABLE_CAPTION = (
    "PSNR in dB (higher = more leakage); MIA AUC 0.5 = members look like non-members; "
    "audited ε: the lower bound the membership scores prove"
)
_TABLE_COLUMNS = (
    "defense",
    "val acc",
    "ε",
    "attack PSNR",
    "predicted PSNR",
    "MIA AUC",
    "audited ε",
    "time (s)",
)


def results_table(results: Iterable[TrialResult | Mapping[str, Any]], title: str) -> Table:
    """The summary table: val accuracy, ε, attack PSNR, predicted PSNR, MIA AUC, audited ε, time.

    A configuration that overrides shared settings shows them under its label; a defense without
    a formal guarantee shows :data:`~lightning_privacy.sweep.results.NO_FORMAL_DP` for ε.

    Example:
        >>> rows = [{"trial_id": "none", "defense": "none", "val_acc": 0.9},
        ...         {"trial_id": "dpsgd=1", "defense": "dpsgd", "epsilon": 6.3,
        ...          "overrides": "data.batch_size=128, model.lr=0.03"},
        ...         {"trial_id": "gaussian_noise=0.1", "defense": "gaussian_noise"}]
        >>> table = results_table(rows, "title")
        >>> table.row_count, str(table.columns[0]._cells[1]).splitlines()[1]
        (3, '  batch_size=128, lr=0.03')
        >>> [str(cell) for cell in table.columns[2]._cells]
        ['∞', '6.30', 'no formal DP']
    """
    from lightning_privacy.sweep.results import as_result

    table = Table(title=title, caption=_TABLE_CAPTION)
    for column in _TABLE_COLUMNS:
        left = column == "defense"
        table.add_column(column, justify="left" if left else "right", no_wrap=left)
    for r in map(as_result, results):
        if not r.ok:
            short = r.status.split(":", 1)[0]
            blanks = [""] * (len(_TABLE_COLUMNS) - 2)
            table.add_row(_label_cell(r), f"[red]{short}[/red]", *blanks)
            continue
        table.add_row(
            _label_cell(r),
            _cell(r.val_acc, ".3f"),
            _cell(r.guarantee, ".2f"),
            _cell(r.attack_psnr, ".1f"),
            _cell(r.predicted_psnr, ".1f"),
            _cell(r.mia_auc, ".3f"),
            _cell(r.audited_epsilon, ".2f"),
            _cell(r.seconds, ".1f"),
        )
    return table


def _print_summary(
    console: Console, results: Iterable[Mapping[str, Any]], title: str
) -> list[TrialResult]:
    """Print the table and one line per failed trial; return the results read."""
    from lightning_privacy.sweep.results import as_result

    rows = [as_result(r) for r in results]
    console.print(results_table(rows, title))
    failed = [f"{r.label}: {r.status}" for r in rows if not r.ok]
    if failed:
        console.print(Text("\n".join(failed), style="yellow"))
    return rows


def run_demo(
    *,
    epochs: int,
    seed: int,
    console: Console,
    dataset: str = "digits",
    out: str | None = None,
    quick: bool = False,
) -> list[dict[str, Any]]:
    """Run the demo configurations in this process, print the table, write the report."""
    from lightning_privacy.sweep import parse_sweep_config
    from lightning_privacy.sweep.runner import run_sweep

    text = demo_config_text(epochs=epochs, seed=seed, dataset=dataset, quick=quick)
    config = parse_sweep_config(text, source="<demo>")
    run_dir = Path(out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    start = time.perf_counter()
    results = run_sweep(
        config,
        run_dir,
        in_process=True,
        console=console,
        title=f"lightning-privacy demo: {dataset} at 16 px, LeNet, CPU",
    )
    _print_summary(
        console, results, f"lightning-privacy demo: {dataset} at 16 px, LeNet, 1 CPU thread"
    )
    console.print(f"Report: {run_dir / 'report.html'}  (total {time.perf_counter() - start:.0f} s)")
    return results


def run_sweep_command(args: argparse.Namespace, console: Console) -> int:
    """``lightning-privacy sweep``: validate everything, then run; 1 if a trial failed.

    Example:
        >>> args = build_parser().parse_args(["sweep", "--config", "/nonexistent.yaml"])
        >>> try:
        ...     run_sweep_command(args, Console())
        ... except Exception as err:
        ...     print(type(err).__name__)
        SweepConfigError
    """
    from lightning_privacy.sweep.check import check_sweep_file
    from lightning_privacy.sweep.results import RESULTS_CSV
    from lightning_privacy.sweep.runner import run_sweep

    config = check_sweep_file(args.config, backend=args.backend)  # every key, then a dry run
    if args.workers is not None and args.workers < 1:
        raise _usage(f"Expected `--workers` to be an int >= 1, but got {args.workers} (int).")
    out = Path(args.out or f"runs/{Path(args.config).stem}")
    results = run_sweep(config, out, workers=args.workers, console=console)
    rows = _print_summary(console, results, f"sweep {config.name}: {len(results)} trials")
    console.print(f"Results: {out / RESULTS_CSV}  Report: {out / 'report.html'}")
    return 0 if all(r.ok for r in rows) else 1


def run_report_command(args: argparse.Namespace, console: Console, errors: Console) -> int:
    """``lightning-privacy report``: 1 when a result file had to be left out (it is named).

    Example:
        >>> args = build_parser().parse_args(["report", "/nonexistent"])
        >>> try:
        ...     run_report_command(args, Console(), Console())
        ... except Exception as err:
        ...     print(type(err).__name__)
        _UsageError
    """
    from lightning_privacy.report import write_report
    from lightning_privacy.sweep.results import scan_run

    run_dir = Path(args.run_dir)
    scan = scan_run(run_dir) if run_dir.is_dir() else None
    if scan is None or not (scan.results or (args.all and scan.stale)):
        bad = "".join(f"\n  {e}" for e in (scan.invalid if scan else ()))
        raise _usage(
            f"{str(run_dir)!r} is not a run directory with finished trials "
            f"(expected trials/*/result.json from `lightning-privacy sweep` or `demo`).{bad}"
        )
    path = write_report(run_dir, path=args.out, include_stale=args.all)
    for error in scan.invalid:
        warning = Text.assemble(("warning: ", "bold yellow"), f"not a valid result: {error}")
        errors.print(warning, soft_wrap=True)
    if scan.stale and not args.all:
        console.print(f"{len(scan.stale)} trial(s) of an earlier configuration not shown (--all).")
    console.print(f"Report: {path}")
    return 1 if scan.invalid else 0


class _UsageError(Exception):
    pass


def _usage(message: str) -> _UsageError:
    return _UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code.

    Example:
        >>> main(["report", "/nonexistent"])  # the message goes to stderr
        2
    """
    args = build_parser().parse_args(argv)  # before the sweep's imports: `--help` stays quick
    from lightning_privacy._process import LockedError
    from lightning_privacy.sweep.config import SweepConfigError

    console = Console(width=None if sys.stdout.isatty() else 120)
    errors = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    try:
        if args.command == "demo":
            run_demo(
                epochs=args.epochs,
                seed=args.seed,
                console=console,
                dataset=args.dataset,
                out=args.out,
                quick=args.quick,
            )
            return 0
        if args.command == "sweep":
            return run_sweep_command(args, console)
        if args.command == "report":
            return run_report_command(args, console, errors)
    except KeyboardInterrupt:
        errors.print(
            "interrupted: the running trials were stopped; what finished is kept, and the same "
            "command resumes."
        )
        return EXIT_INTERRUPTED
    except LockedError as err:
        errors.print(Text.assemble(("error: ", "bold red"), str(err)), soft_wrap=True)
        return EXIT_USAGE
    except (SweepConfigError, _UsageError) as err:
        for problem in getattr(err, "errors", (err,)):  # every problem of a sweep file, one a line
            errors.print(Text.assemble(("error: ", "bold red"), str(problem)), soft_wrap=True)
        return EXIT_USAGE
    return EXIT_USAGE  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
