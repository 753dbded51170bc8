"""Launch a 2-process DDP test script in a clean subprocess and read its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]


def run_script(script: Path, *args: str, cwd: Path, timeout: float = 300) -> None:
    """Run ``python script *args`` in ``cwd`` without inherited DDP variables; fail on an error.

    ``tests/`` is put first on ``PYTHONPATH``, so the script (and Lightning's relaunch of it for
    rank 1) can ``import helpers``.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    for key in ("MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def run_ddp_script(script: Path, out: Path, *args: str, timeout: float = 300) -> Any:
    """:func:`run_script` ``script out *args`` next to ``out``; return ``out``'s JSON."""
    run_script(script, str(out), *args, cwd=out.parent, timeout=timeout)
    return json.loads(out.read_text())
