"""Progress of a long measurement (an attack, an I²F estimate), shown while it runs.

Shown on rank 0 only, and only when the Trainer shows a progress bar itself
(``enable_progress_bar=True``, Lightning's default); a transient rich bar on stderr that disappears
when the measurement ends, so the Trainer's own bar is left as it was.

Example:
    >>> import lightning as L
    >>> trainer = L.Trainer(enable_progress_bar=False, logger=False, enable_model_summary=False)
    >>> with measurement_progress(trainer, "estimating", total=3) as advance:
    ...     advance(1, 3)  # a no-op without the Trainer's progress bar
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import lightning as L
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["measurement_progress"]

Advance = Callable[[int, int], None]


@contextlib.contextmanager
def measurement_progress(
    trainer: L.Trainer, description: str, *, total: int | None
) -> Iterator[Advance]:
    """A context giving ``advance(done, total)`` (``total=None``: elapsed time only)."""
    if getattr(trainer, "progress_bar_callback", None) is None or not trainer.is_global_zero:
        yield lambda done, total: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    with Progress(
        *(columns if total is not None else columns[:1]),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done, total: bar.update(task, completed=done, total=total)
