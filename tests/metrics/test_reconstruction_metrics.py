import math

import pytest
import torch

from lightning_privacy.functional.attacks import Reconstruction
from lightning_privacy.functional.metrics import (
    label_accuracy,
    lpips_available,
    lpips_distance,
    match_order,
)
from lightning_privacy.metrics import reconstruction_metrics


def test_psnr_matches_the_definition_and_torchmetrics():
    from torchmetrics.functional.image import peak_signal_noise_ratio

    target = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    noisy = (
        target + 0.05 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ).clamp(0, 1)
    scores = reconstruction_metrics(noisy, target)
    mse = float(((noisy - target) ** 2).mean())
    assert scores["mse"] == pytest.approx(mse, rel=1e-5)
    assert scores["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert scores["psnr"] == pytest.approx(
        float(peak_signal_noise_ratio(noisy, target, data_range=1.0)), rel=1e-4
    )
    assert 0 < scores["ssim"] < 1
    assert math.isnan(scores["label_acc"])


def test_batches_are_hungarian_matched_and_labels_compared_as_multisets():
    target = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    perm = torch.tensor([2, 0, 1])
    assert torch.equal(target[perm][match_order(target[perm], target)], target)
    rec = Reconstruction(inputs=target[perm], labels=torch.tensor([7, 1, 4]))
    scores = reconstruction_metrics(rec, (target, torch.tensor([1, 4, 5])))
    assert scores["psnr"] == 200.0 and scores["ssim"] == pytest.approx(1.0)
    assert scores["label_acc"] == pytest.approx(2 / 3)
    assert label_accuracy(None, torch.tensor([1])) != label_accuracy(None, torch.tensor([1]))  # nan


def test_out_of_range_reconstructions_are_clamped_and_grey_is_worse_than_copy():
    target = torch.rand(1, 1, 16, 16)
    assert reconstruction_metrics(target + 5.0, target)["mse"] == pytest.approx(
        float(((1 - target) ** 2).mean())
    )
    grey = torch.full_like(target, 0.5)
    assert (
        reconstruction_metrics(grey, target)["psnr"]
        < reconstruction_metrics(target * 0.99, target)["psnr"]
    )


def test_token_sets_and_errors():
    scores = reconstruction_metrics(torch.tensor([1, 2, 3]), torch.tensor([[1, 2], [2, 4]]))
    assert scores == {"token_precision": 2 / 3, "token_recall": 2 / 3}
    with pytest.raises(ValueError, match="equal shape"):
        reconstruction_metrics(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="data_range"):
        reconstruction_metrics(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), data_range=0)


def test_lpips_only_when_weights_are_cached():
    target = torch.rand(1, 3, 32, 32)
    scores = reconstruction_metrics(target, target)
    assert ("lpips" in scores) is lpips_available()
    if not lpips_available():
        with pytest.raises(RuntimeError, match="not cached"):
            lpips_distance(target, target)
        pytest.skip("LPIPS backbone weights are not cached (never downloaded)")
    assert scores["lpips"] == pytest.approx(0.0, abs=1e-4)
