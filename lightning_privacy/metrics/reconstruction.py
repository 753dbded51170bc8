"""``reconstruction_metrics``: how much of a batch an attack rebuilt.

Example:
    >>> import torch
    >>> from lightning_privacy.functional.attacks import Reconstruction
    >>> x = torch.rand(1, 1, 16, 16)
    >>> rec = Reconstruction(inputs=x.clone(), labels=torch.tensor([3]))
    >>> scores = reconstruction_metrics(rec, (x, torch.tensor([3])))
    >>> scores["psnr"], scores["label_acc"], sorted(scores)
    (200.0, 1.0, ['label_acc', 'mse', 'psnr', 'psnr_worst', 'ssim'])
"""

from __future__ import annotations

import contextlib
from typing import Any

from torch import Tensor

from lightning_privacy._validation import check_float
from lightning_privacy.functional.attacks.common import Reconstruction
from lightning_privacy.functional.metrics import (
    image_metrics,
    label_accuracy,
    lpips_available,
    lpips_distance,
    match_order,
    token_metrics,
)


def reconstruction_metrics(
    reconstruction: Reconstruction | Tensor,
    target: Tensor | tuple[Tensor, Tensor | None],
    *,
    data_range: float = 1.0,
) -> dict[str, float]:
    """Score a reconstruction against the true batch.

    Args:
        reconstruction: A :class:`Reconstruction` (inputs and labels) or a tensor of inputs.
        target: The true inputs, or ``(inputs, labels)``.
        data_range: Value range of the images (reconstructions are clamped to it).

    Returns:
        Images: ``mse``, ``psnr`` (dB, mean over images), ``psnr_worst`` (the worst image's),
        ``ssim``, ``label_acc`` (``nan`` when either side has no
        labels), and ``lpips`` only when its backbone weights are already cached (never
        downloaded). Batches are order-matched (Hungarian on pairwise MSE) first; label accuracy
        compares label multisets. Token ids (integer inputs): ``token_precision``,
        ``token_recall``.

    Example:
        >>> import torch
        >>> reconstruction_metrics(torch.tensor([4, 5]), torch.tensor([[4, 4, 6]]))
        {'token_precision': 0.5, 'token_recall': 0.5}
    """
    check_float("data_range", data_range, low=0.0, low_open=True)
    inputs, labels = _unpack(reconstruction)
    if isinstance(target, (tuple, list)):
        true_inputs, true_labels = target[0], target[1] if len(target) > 1 else None
    else:
        true_inputs, true_labels = target, None
    inputs, labels, true_inputs, true_labels = _on_cpu(inputs, labels, true_inputs, true_labels)
    if not inputs.is_floating_point():
        return token_metrics(inputs, true_inputs)
    scores: dict[str, float] = image_metrics(inputs, true_inputs, data_range=data_range)
    scores["label_acc"] = label_accuracy(labels, true_labels)
    if lpips_available() and inputs.dim() == 4 and min(inputs.shape[-2:]) >= 16:
        with contextlib.suppress(Exception):
            scores["lpips"] = lpips_distance(inputs, true_inputs, data_range=data_range)
    return scores


def _on_cpu(*tensors: Tensor | None) -> tuple[Any, ...]:
    """Detached CPU copies: an attack on a GPU model returns CUDA tensors, the truth may be CPU."""
    return tuple(t if t is None else t.detach().cpu() for t in tensors)


def _unpack(reconstruction: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(reconstruction, Reconstruction):
        return reconstruction.inputs, reconstruction.labels
    if isinstance(reconstruction, Tensor):
        return reconstruction, None
    raise TypeError(
        f"Expected a Reconstruction or a tensor of inputs, but got {type(reconstruction).__name__}."
    )


__all__ = ["match_order", "reconstruction_metrics"]
