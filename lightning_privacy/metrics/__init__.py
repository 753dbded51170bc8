"""Reconstruction metrics: PSNR, SSIM, MSE, LPIPS (when cached) and label accuracy.

Example:
    >>> import torch
    >>> from lightning_privacy.metrics import reconstruction_metrics
    >>> x = torch.rand(2, 3, 16, 16)
    >>> round(reconstruction_metrics(x.flip(0), x)["psnr"])
    200
"""

from lightning_privacy.functional.metrics import lpips_available, match_order
from lightning_privacy.metrics.reconstruction import reconstruction_metrics

__all__ = ["lpips_available", "match_order", "reconstruction_metrics"]
