from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_architecture_audit_quick(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "examples/architecture_audit.py",
            "--quick",
            "--architectures",
            "vit_tiny",
            "convnext_atto",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for arch in ("vit_tiny", "convnext_atto"):
        rows = [line for line in lines if arch in line and "dB" not in line]
        assert {"all", "stem", "head"} <= {r.split("│")[2].strip() for r in rows}
    assert "grey image" in result.stdout
    assert (tmp_path / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
