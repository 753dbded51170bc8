from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ablation_ladder_quick():
    """Every variant trains and is attacked; the table has the paper's step beside ours."""
    result = subprocess.run(
        [sys.executable, "examples/ablation_ladder.py", "--quick"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("# ")]
    variants = [line[2:].split(":")[0] for line in lines]
    assert variants == ["base", "patchify", "gelu", "fewer_act", "no_norm", "layer_norm"]
    assert "+17.51" in result.stdout  # the paper's step for removing activations
    assert all(float(line.split("PSNR ")[1].split(" dB")[0]) > 0 for line in lines)
