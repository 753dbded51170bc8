"""Worker processes that die with their parent, and a lock file that one process holds.

A sweep trains each trial in a spawned process. :func:`run_child` is that process's entry
point: it makes the process die with its parent (``PR_SET_PDEATHSIG`` on Linux, and a thread
that watches the parent's pid everywhere), leaves Ctrl-C to the parent (which stops the workers
itself), runs the trial and sends back its result. :class:`DirectoryLock` is the lock file that
keeps a second run of the same sweep out of its directory while the first one lives (an
``flock``: released by the kernel when its holder dies, even by ``SIGKILL``).

Nothing here imports the rest of the package, so a worker starts without importing torch.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with DirectoryLock(d, "demo") as lock:
    ...         try:
    ...             DirectoryLock(d, "demo").acquire()
    ...         except LockedError as err:
    ...             print(err.holder["pid"] == os.getpid())
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "DirectoryLock", "LockedError", "die_with_parent", "run_child"]

#: The lock file of a run directory.
LOCK_FILE = ".lock"
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, *, poll_seconds: float = 0.5) -> None:
    """Make this process exit as soon as the process ``parent_pid`` is gone.

    On Linux the kernel sends ``SIGKILL`` when the parent dies (``prctl(PR_SET_PDEATHSIG)``);
    elsewhere, and as a fallback, a daemon thread checks ``os.getppid()`` every
    ``poll_seconds`` and ends the process with ``os._exit``.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(70)  # the parent is gone: nobody will read what this process would produce

    if os.getppid() != parent_pid:
        os._exit(70)
    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def run_child(fn: Callable[..., Any], args: tuple[Any, ...], conn: Any, parent_pid: int) -> None:
    """Entry point of a worker: ``fn(*args)``; sends ``("ok", result)`` or ``("raised", error)``.

    The worker ignores ``SIGINT`` (a Ctrl-C in the terminal reaches the whole process group;
    the parent then terminates its workers) and dies with its parent.
    """
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        message: tuple[str, Any] = ("ok", fn(*args))
    except BaseException as err:  # handed to the parent, which decides
        message = ("raised", err)
    try:
        conn.send(message)
    except Exception as err:  # an unpicklable result or error: its text still gets through
        conn.send(("raised", RuntimeError(f"{type(err).__name__}: {err}")))
    finally:
        conn.close()


class LockedError(RuntimeError):
    """Another live process holds the lock.

    Attributes:
        path: The lock file.
        holder: What the holder wrote into it (``pid``, ``started``, ``what``), if readable.
    """

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        who = f"pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
        super().__init__(
            f"Another {holder.get('what', 'run')} ({who}) is using {str(path.parent)!r}: a second "
            "one would train the same trials at the same time. Wait for it to finish or stop "
            f"it, then run this command again (the lock is {str(path)!r}; it is released when "
            "its holder exits, however it exits)."
        )
        self.path, self.holder = path, holder


class DirectoryLock:
    """An exclusive ``flock`` on ``<directory>/.lock``, from :meth:`acquire` to :meth:`release`.

    Args:
        directory: The directory to lock (created if missing).
        what: What holds it, for the message a second process gets (``"sweep"``).
    """

    def __init__(self, directory: str | Path, what: str) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        """Take the lock or raise :class:`LockedError` naming its holder."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LockedError(self.path, self._holder()) from None
        record = {
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "what": self.what,
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        self._fd = fd
        return self

    def _holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        """Give the lock up (the file stays; only the lock on it matters)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
