"""Reconstruction quality as pure functions: order matching, MSE, PSNR, SSIM, LPIPS, labels.

Conventions (Breaching's ``analysis.report``, see the research notes): images are compared in
``[0, data_range]`` with the reconstruction clamped to that range; PSNR is computed per image and
averaged; SSIM is the standard Gaussian SSIM of torchmetrics (not Breaching's CW-SSIM); a batch is
first put in the order that minimises the total pairwise MSE (Hungarian algorithm), since a
gradient does not tell which reconstruction belongs to which sample.

Example:
    >>> import torch
    >>> target = torch.rand(2, 1, 16, 16)
    >>> scores = image_metrics(target.flip(0), target)
    >>> scores["mse"], scores["psnr"] > 100
    (0.0, True)
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

LPIPS_BACKBONES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
    "vgg": "vgg16-397923af.pth",
}


def match_order(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Permutation ``p`` such that ``reconstruction[p]`` best matches ``target`` (min total MSE).

    Example:
        >>> t = torch.stack([torch.zeros(3), torch.ones(3)])
        >>> match_order(t.flip(0), t).tolist()
        [1, 0]
    """
    from scipy.optimize import linear_sum_assignment

    if len(reconstruction) != len(target):
        raise ValueError(
            f"Expected as many reconstructions as targets, but got {len(reconstruction)} "
            f"and {len(target)}."
        )
    cost = torch.cdist(target.flatten(1).double(), reconstruction.flatten(1).double()) ** 2
    rows, cols = linear_sum_assignment(cost.numpy())
    order = torch.empty(len(target), dtype=torch.long)
    order[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return order


def _ssim_kernel(size: int) -> int:
    kernel = min(11, size if size % 2 else size - 1)
    return max(kernel, 1)


def image_metrics(
    reconstruction: Tensor, target: Tensor, *, data_range: float = 1.0, match: bool = True
) -> dict[str, float]:
    """MSE, PSNR (dB, mean over images) and SSIM of order-matched, clamped reconstructions.

    Args:
        reconstruction: ``(N, C, H, W)`` reconstructed images.
        target: ``(N, C, H, W)`` true images in ``[0, data_range]``.
        data_range: Value range of the images.
        match: Hungarian-match the order first.

    Returns:
        ``{"mse", "psnr", "psnr_worst", "ssim"}`` as floats: ``psnr`` the mean over images,
        ``psnr_worst`` the lowest single image's (after matching), both capped at 200 dB for
        exact copies.

    Example:
        >>> t = torch.full((2, 1, 8, 8), 0.5)
        >>> rec = t + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)
        >>> scores = image_metrics(rec, t)
        >>> round(scores["psnr"], 1), round(scores["psnr_worst"], 1)
        (30.0, 20.0)
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    if reconstruction.shape != target.shape:
        raise ValueError(
            f"Expected reconstruction and target of equal shape, but got "
            f"{tuple(reconstruction.shape)} and {tuple(target.shape)}."
        )
    rec = reconstruction.detach().float().clamp(0.0, data_range)
    tgt = target.detach().float()
    if match and len(rec) > 1:
        rec = rec[match_order(rec, tgt)]
    per_image = ((rec - tgt) ** 2).flatten(1).mean(1)
    psnr = [
        200.0 if m <= 1e-20 else min(200.0, 10 * math.log10(data_range**2 / m))
        for m in per_image.tolist()
    ]
    if rec.dim() == 4:
        ssim = structural_similarity_index_measure(
            rec, tgt, data_range=data_range, kernel_size=_ssim_kernel(min(rec.shape[-2:]))
        )
        ssim_value = float(ssim)  # type: ignore[arg-type]
    else:
        ssim_value = float("nan")
    return {
        "mse": float(per_image.mean()),
        "psnr": sum(psnr) / len(psnr),
        "psnr_worst": min(psnr),
        "ssim": ssim_value,
    }


def label_accuracy(predicted: Tensor | None, target: Tensor | None) -> float:
    """Fraction of target labels recovered, as multisets (order-free); ``nan`` if unknown.

    Example:
        >>> label_accuracy(torch.tensor([3, 1]), torch.tensor([1, 2]))
        0.5
    """
    if predicted is None or target is None:
        return float("nan")
    hits = Counter(predicted.reshape(-1).tolist()) & Counter(target.reshape(-1).tolist())
    return sum(hits.values()) / max(target.numel(), 1)


def token_metrics(recovered: Tensor, tokens: Tensor) -> dict[str, float]:
    """Precision and recall of a recovered token set against the batch's token ids.

    Example:
        >>> token_metrics(torch.tensor([1, 2, 9]), torch.tensor([[1, 2, 2, 3]]))
        {'token_precision': 0.6666666666666666, 'token_recall': 0.6666666666666666}
    """
    found, truth = set(recovered.reshape(-1).tolist()), set(tokens.reshape(-1).tolist())
    hits = len(found & truth)
    return {
        "token_precision": hits / max(len(found), 1),
        "token_recall": hits / max(len(truth), 1),
    }


def lpips_available(net_type: str = "alex") -> bool:
    """Whether LPIPS can run offline: torchvision and the backbone weights are already cached.

    Nothing is ever downloaded; without the file under ``$TORCH_HOME/hub/checkpoints`` LPIPS is
    simply not reported.

    Example:
        >>> isinstance(lpips_available(), bool)
        True
    """
    try:
        import torchvision  # noqa: F401
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    path = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net_type]
    return path.is_file()


def lpips_distance(
    reconstruction: Tensor, target: Tensor, *, data_range: float = 1.0, net_type: str = "alex"
) -> float:
    """LPIPS (torchmetrics) between matched images, grey images repeated to 3 channels.

    Raises:
        RuntimeError: If the backbone weights are not cached (see :func:`lpips_available`).

    Example:
        >>> x = torch.rand(1, 3, 32, 32)
        >>> lpips_distance(x, x) if lpips_available() else 0.0
        0.0
    """
    if not lpips_available(net_type):
        raise RuntimeError(f"LPIPS backbone weights for {net_type!r} are not cached; not fetching.")
    from torchmetrics.functional.image import learned_perceptual_image_patch_similarity

    rec = reconstruction.detach().float().clamp(0.0, data_range) / data_range
    tgt = target.detach().float() / data_range
    if len(rec) > 1:
        rec = rec[match_order(rec, tgt)]
    if rec.shape[1] == 1:
        rec, tgt = rec.expand(-1, 3, -1, -1), tgt.expand(-1, 3, -1, -1)
    value = learned_perceptual_image_patch_similarity(
        rec,
        tgt,
        net_type=net_type,  # type: ignore[arg-type]
        normalize=True,
    )
    return float(value)
