"""A sweep of 3 trials that sleep, for the interrupt, kill and lock tests.

``python sweep_script.py OUT`` runs it in ``OUT`` (one worker; each trial writes its pid to
``OUT/pids/<trial_id>`` and sleeps ``TRIAL_SECONDS``, default 60, before storing its result;
on Ctrl-C it does what Lightning's Trainer does: ignores further Ctrl-C and exits with 1).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

SWEEP = "defenses:\n  - {name: gaussian_noise, strengths: [1, 2, 3]}\nworkers: 1\n"


def slow_trial(spec, out):
    from lightning_privacy.sweep.config import TrialSpec
    from lightning_privacy.sweep.results import TrialResult, write_result

    trial = TrialSpec.from_dict(spec)
    pids = Path(out) / "pids"
    pids.mkdir(exist_ok=True)
    (pids / trial.trial_id).write_text(str(os.getpid()))
    try:
        time.sleep(float(os.environ.get("TRIAL_SECONDS", "60")))
    except KeyboardInterrupt:  # what Lightning's Trainer does on Ctrl-C: shut down, exit(1),
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # and ignore any further Ctrl-C
        sys.exit(1)
    result = TrialResult.finished(trial, val_acc=0.5)
    write_result(out, result)
    return result.to_dict()


def main() -> int:
    from lightning_privacy.sweep import parse_sweep_config
    from lightning_privacy.sweep.runner import run_sweep

    try:
        run_sweep(parse_sweep_config(SWEEP), sys.argv[1], trial_fn=slow_trial, progress=False)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
