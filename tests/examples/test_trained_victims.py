from __future__ import annotations

import sys

import torch
from helpers import REPO, run_example


def test_trained_victims_quick(tmp_path):
    """Each architecture is attacked untrained and trained; training raised its accuracy; the
    grid (truth on top) is owner-readable only."""
    grid = tmp_path / "victims.png"
    result = run_example("examples/trained_victims.py", "--quick", "--grid", str(grid), columns=220)
    rows = [line.split("│") for line in result.stdout.splitlines() if line.startswith("│")]
    states = [(r[3].strip(), float(r[5])) for r in rows if r[3].strip() in ("untrained", "trained")]
    assert [s for s, _ in states] == ["untrained", "trained"] * 3
    for (_, before), (_, after) in zip(states[::2], states[1::2], strict=True):
        assert after > before  # the trained row is the trained network
    assert any("grey image" in r[1] for r in rows)
    assert grid.read_bytes()[:4] == b"\x89PNG" and grid.stat().st_mode & 0o077 == 0


def test_training_stops_at_the_target_accuracy():
    """``StopAtAccuracy`` ends the fit at the first epoch whose training accuracy reaches the
    target (0 is reached at once), and not before a target that is never reached."""
    sys.path.insert(0, str(REPO / "examples"))
    from _common import StopAtAccuracy, fit_classifier

    x = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40) % 2
    data = {"train": (x, y), "classes": 2}
    for target, epochs in ((0.0, 1), (1.01, 3)):
        stop = StopAtAccuracy(target, x, y)
        fit_classifier(
            lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2)),
            data,
            epochs=3,
            lr=1e-3,
            seed=0,
            callbacks=[stop],
        )
        assert stop.epochs == epochs
