from __future__ import annotations

from helpers import run_example


def test_text_leakage_quick():
    result = run_example("examples/text_leakage.py", "--quick", "--vocab", "300")
    rows = [line.split("│") for line in result.stdout.splitlines() if line.count("│") == 7]
    none = [r for r in rows if r[3].strip() == "none"]
    assert len(none) == 4  # tied/untied x init/trained
    # at initialisation, without a defense, the word set of the batch leaks entirely
    at_init = [r for r in none if r[2].strip() == "init"]
    assert len(at_init) == 2
    assert all(float(r[4]) >= 0.95 and float(r[5]) >= 0.95 for r in at_init), at_init
    assert "Recovered" in result.stdout
