from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_text_leakage_quick():
    result = subprocess.run(
        [sys.executable, "examples/text_leakage.py", "--quick", "--vocab", "300"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("│") for line in result.stdout.splitlines() if line.count("│") == 7]
    none = [r for r in rows if r[3].strip() == "none"]
    assert len(none) == 4  # tied/untied x init/trained
    # at initialisation, without a defense, the word set of the batch leaks entirely
    at_init = [r for r in none if r[2].strip() == "init"]
    assert len(at_init) == 2
    assert all(float(r[4]) >= 0.95 and float(r[5]) >= 0.95 for r in at_init), at_init
    assert "Recovered" in result.stdout
