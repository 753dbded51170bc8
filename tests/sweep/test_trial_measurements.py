import math
from types import SimpleNamespace

import torch

from lightning_privacy.sweep.trial import _measurements


def test_a_failed_last_measurement_leaves_no_stale_value_in_the_result():
    history = {"attack/psnr": [[1.0, 72.6], [2.0, math.nan]], "leakage/predicted_psnr": [[1, 30.0]]}
    trainer = SimpleNamespace(
        callback_metrics={"attack/psnr": torch.tensor(math.nan), "val/acc": torch.tensor(0.5)}
    )
    measured = _measurements(trainer, history, "gaussian_noise")
    assert measured["attack_psnr"] is None  # not the 72.6 of the run before
    assert measured["predicted_psnr"] == 30.0 and measured["val_acc"] == 0.5
    assert _measurements(SimpleNamespace(callback_metrics={}), {}, "none")["epsilon"] == math.inf
