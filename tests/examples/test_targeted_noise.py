from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_targeted_noise_quick():
    """Noise on the stem stops the closed-form stem attack; no defense leaves it exact."""
    result = subprocess.run(
        [sys.executable, "examples/targeted_noise.py", "--quick"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    psnr = {}
    for line in result.stdout.splitlines():
        if line.startswith("# "):
            label, rest = line[2:].split(": ", 1)
            psnr[label.split(",")[0]] = float(rest.split("attack ")[1].split(" dB")[0])
    assert set(psnr) == {"none", "stem only", "all layers"}
    assert psnr["none"] >= 60.0  # exact up to float32
    assert psnr["stem only"] < 25.0 < psnr["none"]
