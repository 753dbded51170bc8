import math

import torch

from lightning_privacy.functional.attacks.common import Stopwatch, Trial, best_of_restarts


def _trials(losses):
    """Trials with the given losses, the i-th one's inputs ``[i]``, 3 evaluations each."""
    runs = iter(enumerate(losses))

    def run_trial():
        index, loss = next(runs)
        return Trial(loss, torch.tensor([float(index)]), None, [], 3)

    return run_trial


def test_best_of_restarts_keeps_the_first_of_equal_losses_and_counts_evaluations():
    trials = _trials([math.inf, 2.0, 2.0, 5.0])
    kept, losses, evaluations = best_of_restarts(trials, 4, stop=lambda trial: False)
    assert kept.loss == 2.0 and kept.inputs.tolist() == [1.0]
    assert losses == [math.inf, 2.0, 2.0, 5.0] and evaluations == 12


def test_best_of_restarts_keeps_a_lone_diverged_trial_and_stops_when_told():
    kept, losses, evaluations = best_of_restarts(
        _trials([math.inf, 0.0]), 2, stop=lambda trial: True
    )
    assert kept.loss == math.inf and losses == [math.inf] and evaluations == 3


def test_stopwatch_budget():
    assert not Stopwatch().expired()
    assert not Stopwatch(max_seconds=1e9).expired()
    assert Stopwatch(max_seconds=-1.0).expired()
