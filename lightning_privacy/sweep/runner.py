"""Run a sweep: skip finished trials, run the rest locally or on Ray Tune, then write the outputs.

Outputs in the run directory:

* ``trials/<trial_id>/result.json`` -- one per finished trial (written atomically, so an
  interrupted sweep resumes where it stopped), plus the images the audit wrote;
* ``results.csv`` -- one row per trial of the grid;
* ``pareto_attack_psnr.png``, ``pareto_predicted_psnr.png``, ``pareto_epsilon.png``;
* ``report.html`` -- the self-contained report (:mod:`lightning_privacy.report`);
* ``sweep.json`` (the validated configuration) and ``events.log`` (trial starts and finishes).

Example:
    >>> import tempfile
    >>> from lightning_privacy.sweep.config import parse_sweep_config
    >>> config = parse_sweep_config("defenses: [{name: none}]")
    >>> fake = lambda spec, out: {"trial_id": spec["defense"], "status": "ok", "val_acc": 0.5}
    >>> with tempfile.TemporaryDirectory() as d:
    ...     rows = run_sweep(config, d, trial_fn=fake, in_process=True, progress=False)
    >>> rows[0]["val_acc"]
    0.5
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from lightning_privacy.sweep.config import SweepConfig, TrialSpec, check_backend
from lightning_privacy.sweep.pareto import write_pareto_plots
from lightning_privacy.sweep.trial import (
    RESULT_COLUMNS,
    load_finished,
    log_event,
    safe_run_trial,
    write_json_atomic,
)

TrialFn = Callable[[Mapping[str, Any], str], dict[str, Any]]


def progress_bar(console: Console | None = None, *, disable: bool = False) -> Progress:
    """The rich progress bar used for every long step of the command line.

    Example:
        >>> with progress_bar(disable=True) as bar:
        ...     task = bar.add_task("work", total=2)
        ...     bar.advance(task)
    """
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=disable,
        transient=False,
    )


def write_results_csv(results: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write the :data:`~lightning_privacy.sweep.trial.RESULT_COLUMNS` of every result.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = write_results_csv([{"trial_id": "a", "val_acc": 0.5}], os.path.join(d, "r.csv"))
        ...     p.read_text().splitlines()[1]
        'a,,,0.5,,,,,,'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(RESULT_COLUMNS)
        for row in results:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in RESULT_COLUMNS])
    tmp.replace(path)
    return path


def read_results_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``results.csv`` as dicts of strings."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _run_local(
    pending: list[TrialSpec],
    out_dir: Path,
    workers: int,
    trial_fn: TrialFn,
    on_done: Callable[[TrialSpec, dict[str, Any]], None],
) -> None:
    """Each trial in a fresh spawned process (``workers`` at a time)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures: dict[Future[dict[str, Any]], TrialSpec] = {
            pool.submit(trial_fn, spec.to_dict(), str(out_dir)): spec for spec in pending
        }
        remaining = set(futures)
        try:
            while remaining:
                done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for future in done:
                    on_done(futures[future], future.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _ray_trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: the same trial function, then report its scalars."""
    from ray import tune

    result = safe_run_trial(config["spec"], config["out_dir"])
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
    tune.report(scalars)


def _run_ray(
    pending: list[TrialSpec],
    out_dir: Path,
    workers: int,
    on_done: Callable[[TrialSpec, dict[str, Any]], None],
) -> None:
    """The pending trials as one Ray Tune grid (one CPU each, ``workers`` concurrent).

    On a cluster, start Ray first (``ray start``/``RAY_ADDRESS``) and the same call scales out;
    the trials write their results to ``out_dir``, which must then be on a shared file system.
    """
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own tables would break the bar
    import ray
    from ray import tune

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            num_cpus=None if "RAY_ADDRESS" in os.environ else workers,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    try:
        tuner = tune.Tuner(
            tune.with_resources(_ray_trainable, {"cpu": 1}),
            param_space={
                "spec": tune.grid_search([s.to_dict() for s in pending]),
                "out_dir": str(out_dir.resolve()),
            },
            tune_config=tune.TuneConfig(max_concurrent_trials=workers),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str((out_dir / "ray").resolve()),
                verbose=0,
            ),
        )
        tuner.fit()
    finally:
        if started_here:
            ray.shutdown()
    for spec in pending:
        result = load_finished(out_dir, spec)
        on_done(spec, result if result is not None else _failed(spec, out_dir))


def _failed(spec: TrialSpec, out_dir: Path) -> dict[str, Any]:
    error = out_dir / "trials" / spec.trial_id / "error.txt"
    reason = error.read_text().strip().splitlines()[-1] if error.is_file() else "no result"
    return {
        "trial_id": spec.trial_id,
        "label": spec.label,
        "defense": spec.defense,
        "strength": spec.strength,
        "status": f"failed: {reason}",
    }


def run_sweep(
    config: SweepConfig,
    out_dir: str | Path,
    *,
    backend: str | None = None,
    workers: int | None = None,
    in_process: bool = False,
    trial_fn: TrialFn = safe_run_trial,
    console: Console | None = None,
    progress: bool = True,
    title: str | None = None,
) -> list[dict[str, Any]]:
    """Run every unfinished trial of ``config`` and write the sweep's outputs into ``out_dir``.

    Args:
        config: A validated configuration (:func:`~lightning_privacy.sweep.load_sweep_config`).
        out_dir: Run directory; finished trials found there are not run again.
        backend: ``"local"`` (spawned processes) or ``"ray"``; defaults to the config's.
        workers: Concurrent trials; defaults to the config's ``workers``.
        in_process: Run the trials one by one in this process (the demo; tests).
        trial_fn: The trial function (:func:`~lightning_privacy.sweep.trial.safe_run_trial`).
        console: Where the progress bar goes.
        progress: Show the progress bar.
        title: Report title.

    Returns:
        The results of every trial of the grid, in grid order.
    """
    backend = check_backend(backend or config.backend, key="--backend")
    workers = workers or config.workers
    console = console or Console(stderr=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"lightning-privacy sweep: {config.name}"
    write_json_atomic(out / "sweep.json", {**asdict(config), "title": title})
    specs = config.trials()
    results: dict[str, dict[str, Any]] = {}
    for spec in specs:
        finished = load_finished(out, spec)
        if finished is not None:
            results[spec.trial_id] = finished
            log_event(out, f"skip {spec.trial_id} (finished)")
    pending = [s for s in specs if s.trial_id not in results]
    if results:
        console.print(f"Resuming: {len(results)} finished trial(s) skipped, {len(pending)} to run.")
    with progress_bar(console, disable=not progress) as bar:
        task = bar.add_task(f"sweep ({backend})", total=len(specs), completed=len(results))

        def on_done(spec: TrialSpec, result: dict[str, Any]) -> None:
            results[spec.trial_id] = result
            bar.update(task, advance=1, description=f"done {spec.label}")

        if not pending:
            pass
        elif in_process:
            for spec in pending:
                bar.update(task, description=f"training {spec.label}")

                def show(epoch: int, total: int, label: str = spec.label) -> None:
                    bar.update(task, description=f"training {label}: epoch {epoch}/{total}")

                if trial_fn is safe_run_trial:
                    result = safe_run_trial(spec.to_dict(), str(out), progress=show)
                else:
                    result = trial_fn(spec.to_dict(), str(out))
                on_done(spec, result)
        elif backend == "ray":
            _run_ray(pending, out, workers, on_done)
        else:
            _run_local(pending, out, workers, trial_fn, on_done)
    ordered = [results[s.trial_id] for s in specs]
    write_results_csv(ordered, out / "results.csv")
    write_pareto_plots([r for r in ordered if r.get("status") == "ok"], out)
    from lightning_privacy.report import write_report

    write_report(out, results=ordered, title=title)
    return ordered


def load_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """Results of a run directory: every ``trials/*/result.json``, in ``results.csv`` order.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     load_results(d)
        []
    """
    out = Path(out_dir)
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("trials/*/result.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found[str(result.get("trial_id", path.parent.name))] = result
    order: list[str] = []
    if (out / "results.csv").is_file():
        order = [row["trial_id"] for row in read_results_csv(out / "results.csv")]
    ranked = [found[t] for t in order if t in found]
    return ranked + [r for t, r in found.items() if t not in order]
