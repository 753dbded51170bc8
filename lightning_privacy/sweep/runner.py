"""Run a sweep: skip finished trials, run the rest locally or on Ray Tune, then write the outputs.

Outputs in the run directory:

* ``trials/<trial_id>/result.json`` -- one per finished trial (written atomically, so an
  interrupted sweep resumes where it stopped), plus the images the audit wrote;
* ``results.csv`` -- one row per trial of the grid;
* ``pareto_attack_psnr.png``, ``pareto_predicted_psnr.png``, ``pareto_epsilon.png``;
* ``report.html`` -- the self-contained report (:mod:`lightning_privacy.report`);
* ``sweep.json`` (the validated configuration and the ids of its trials) and ``events.log``
  (trial starts, finishes, skips, results set aside, interruptions).

Reading them back is :mod:`lightning_privacy.sweep.results`.

Durability. Each local trial runs in its own spawned process that dies with the sweep (even
when the sweep is killed with ``SIGKILL``) and ignores Ctrl-C: on Ctrl-C the sweep terminates
its workers at once, writes nothing but an ``interrupted`` line to ``events.log`` and raises
``KeyboardInterrupt`` (what finished is kept; a rerun resumes). A lock file (``.lock``, an
``flock`` the kernel releases when the sweep dies) refuses a second concurrent run of the same
directory with :class:`~lightning_privacy._process.LockedError`. A stored ``result.json`` that is
not a valid result (truncated, not an object, keys missing, newer schema) is moved aside to
``result.invalid.json``, named on the console and in ``events.log``, and its trial runs again.

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

import multiprocessing
import multiprocessing.connection
import os
from collections.abc import Callable, Mapping, Sequence
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

from lightning_privacy._process import DirectoryLock, LockedError, run_child
from lightning_privacy.report import write_report
from lightning_privacy.sweep.config import SweepConfig, TrialSpec, check_backend
from lightning_privacy.sweep.pareto import write_pareto_plots
from lightning_privacy.sweep.results import (
    RESULTS_CSV,
    InvalidResultError,
    TrialResult,
    check_finished,
    load_finished,
    load_results,
    read_results_csv,
    set_aside,
    trial_dir,
    write_results_csv,
    write_sweep_record,
)
from lightning_privacy.sweep.trial import log_event, safe_run_trial

__all__ = [
    "LockedError",
    "TrialFn",
    "load_results",
    "progress_bar",
    "read_results_csv",
    "run_sweep",
    "write_results_csv",
]

#: A trial function: ``(spec as a dict, run directory) -> result dict`` (``result.json``'s).
TrialFn = Callable[[Mapping[str, Any], str], Mapping[str, Any]]
#: Called with each trial and its result as the trial function returned it.
_OnDone = Callable[[TrialSpec, Mapping[str, Any]], None]


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


class _Worker:
    """One trial in its own spawned process, which dies with this one and ignores Ctrl-C."""

    def __init__(self, context: Any, trial_fn: TrialFn, spec: TrialSpec, out_dir: Path) -> None:
        self.spec = spec
        self.conn, child = context.Pipe(duplex=False)
        args = (trial_fn, (spec.to_dict(), str(out_dir)), child, os.getpid())
        self.process = context.Process(target=run_child, args=args, name=f"trial {spec.label}")
        self.process.start()
        child.close()  # this end belongs to the worker: EOF here once it is gone

    def result(self) -> Mapping[str, Any]:
        """The worker's result once it sent one (or died); re-raises what the trial raised."""
        try:
            status, value = self.conn.recv()
        except EOFError:  # it died without a word (killed, out of memory, segfault)
            self.process.join()
            code = self.process.exitcode
            return {"status": f"failed: the trial's process exited with code {code}"}
        self.process.join()
        if status == "raised":
            raise value
        return value

    def stop(self) -> None:
        """Kill the worker now.

        ``SIGKILL``: Lightning answers ``SIGTERM`` with a graceful stop that can take seconds, and
        an unfinished trial has written no result (``result.json`` is written atomically).
        """
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _run_local(
    pending: list[TrialSpec], out_dir: Path, workers: int, trial_fn: TrialFn, on_done: _OnDone
) -> None:
    """Each trial in a fresh spawned process (``workers`` at a time), stopped with the sweep.

    On any exception -- Ctrl-C's ``KeyboardInterrupt`` included -- every running worker is
    terminated before it propagates; nothing queued starts.
    """
    context = multiprocessing.get_context("spawn")
    queue: list[TrialSpec] = list(pending)
    running: list[_Worker] = []
    try:
        while queue or running:
            while queue and len(running) < workers:
                running.append(_Worker(context, trial_fn, queue.pop(0), out_dir))
            ready = multiprocessing.connection.wait([w.conn for w in running])
            for worker in [w for w in running if w.conn in ready]:
                running.remove(worker)
                on_done(worker.spec, worker.result())
    finally:
        for worker in running:
            worker.stop()


def _ray_trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: the same trial function, then report its scalars."""
    from ray import tune

    result = safe_run_trial(config["spec"], config["out_dir"])
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
    tune.report(scalars)


def _run_ray(pending: list[TrialSpec], out_dir: Path, workers: int, on_done: _OnDone) -> None:
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
        result = load_finished(out_dir, spec) or _failed(spec, out_dir)
        on_done(spec, result.to_dict())


def _failed(spec: TrialSpec, out_dir: Path) -> TrialResult:
    """The result of a trial that left no ``result.json``: the last line of its ``error.txt``."""
    error = trial_dir(out_dir, spec.trial_id) / "error.txt"
    reason = error.read_text().strip().splitlines()[-1] if error.is_file() else "no result"
    return TrialResult.failed(spec, reason)


def _run_in_process(
    pending: list[TrialSpec],
    out_dir: Path,
    trial_fn: TrialFn,
    on_done: _OnDone,
    show: Callable[[str], None],
) -> None:
    """The trials one by one in this process; ``show`` gets what is training (epoch by epoch)."""
    for spec in pending:
        show(f"training {spec.label}")

        def epoch(done: int, total: int, label: str = spec.label) -> None:
            show(f"training {label}: epoch {done}/{total}")

        result: Mapping[str, Any]
        if trial_fn is safe_run_trial:
            result = safe_run_trial(spec.to_dict(), str(out_dir), progress=epoch)
        else:
            result = trial_fn(spec.to_dict(), str(out_dir))
        on_done(spec, result)


def _finished_trials(
    specs: Sequence[TrialSpec], out_dir: Path, console: Console
) -> dict[str, Mapping[str, Any]]:
    """The results of the trials that finished in an earlier run, by trial id (logged as skips).

    An invalid ``result.json`` is set aside, named on the console and in ``events.log``; its
    trial runs again.
    """
    finished: dict[str, Mapping[str, Any]] = {}
    for spec in specs:
        try:
            result = check_finished(out_dir, spec)
        except InvalidResultError as err:
            moved = set_aside(err.path)
            note = f"{err.path.relative_to(out_dir)} is not a valid result ({err.reason})"
            console.print(f"[yellow]{note}: moved to {moved.name}; the trial runs again.[/yellow]")
            log_event(out_dir, f"invalid {spec.trial_id} ({err.reason}); set aside, rerun")
            continue
        if result is not None:
            finished[spec.trial_id] = result.to_dict()
            log_event(out_dir, f"skip {spec.trial_id} (finished)")
    return finished


def _write_outputs(
    specs: Sequence[TrialSpec], results: Sequence[Mapping[str, Any]], out_dir: Path, title: str
) -> None:
    """``results.csv``, the Pareto plots and ``report.html`` of the whole grid."""
    rows = [TrialResult.from_dict(r, spec=s) for s, r in zip(specs, results, strict=True)]
    write_results_csv(rows, out_dir / RESULTS_CSV)
    write_pareto_plots([r.to_dict() for r in rows if r.ok], out_dir)
    write_report(out_dir, results=rows, title=title)


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

    Raises:
        LockedError: If another live process runs a sweep in ``out_dir`` (nothing is done).
        KeyboardInterrupt: On Ctrl-C, once the running trials are stopped.

    Returns:
        The result of every trial of the grid, in grid order: as the trial function returned
        it, or the stored ``result.json`` of a trial that had finished before.

    Example:
        >>> import os, tempfile
        >>> from lightning_privacy.sweep.config import parse_sweep_config
        >>> config = parse_sweep_config("defenses: [{name: gaussian_noise, strengths: [0.1]}]")
        >>> failing = lambda spec, out: {"status": "failed: no GPU"}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     rows = run_sweep(config, d, trial_fn=failing, in_process=True, progress=False)
        ...     files = sorted(f for f in os.listdir(d) if not f.endswith(".png") and f[0] != ".")
        ...     row = read_results_csv(os.path.join(d, "results.csv"))[0]
        >>> files, rows
        (['report.html', 'results.csv', 'sweep.json'], [{'status': 'failed: no GPU'}])
        >>> row["defense"], row["strength"], row["status"]  # the identity comes from the spec
        ('gaussian_noise', '0.1', 'failed: no GPU')
    """
    backend = check_backend(backend or config.backend, key="--backend")
    out = Path(out_dir)
    with DirectoryLock(out, "lightning-privacy sweep"):
        try:
            return _run_sweep_locked(
                config,
                out,
                backend=backend,
                workers=workers or config.workers,
                in_process=in_process,
                trial_fn=trial_fn,
                console=console or Console(stderr=True),
                progress=progress,
                title=title or f"lightning-privacy sweep: {config.name}",
            )
        except KeyboardInterrupt:
            log_event(out, "interrupted (Ctrl-C): running trials stopped; rerun to resume")
            raise


def _run_sweep_locked(
    config: SweepConfig,
    out: Path,
    *,
    backend: str,
    workers: int,
    in_process: bool,
    trial_fn: TrialFn,
    console: Console,
    progress: bool,
    title: str,
) -> list[dict[str, Any]]:
    """:func:`run_sweep` once its directory is locked."""
    specs = config.trials()
    record = {**asdict(config), "title": title, "trials": [s.trial_id for s in specs]}
    write_sweep_record(out, record)
    results: dict[str, Mapping[str, Any]] = _finished_trials(specs, out, console)
    pending = [s for s in specs if s.trial_id not in results]
    if results:
        console.print(f"Resuming: {len(results)} finished trial(s) skipped, {len(pending)} to run.")
    with progress_bar(console, disable=not progress) as bar:
        task = bar.add_task(f"sweep ({backend})", total=len(specs), completed=len(results))

        def on_done(spec: TrialSpec, result: Mapping[str, Any]) -> None:
            results[spec.trial_id] = result
            bar.update(task, advance=1, description=f"done {spec.label}")

        def show(text: str) -> None:
            bar.update(task, description=text)

        if in_process:
            _run_in_process(pending, out, trial_fn, on_done, show)
        elif pending and backend == "ray":
            _run_ray(pending, out, workers, on_done)
        elif pending:
            _run_local(pending, out, workers, trial_fn, on_done)
    ordered = [dict(results[s.trial_id]) for s in specs]
    _write_outputs(specs, ordered, out, title)
    return ordered
