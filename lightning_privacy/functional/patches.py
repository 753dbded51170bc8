"""Input patches of a ``Conv2d`` and their adjoint, from strided views (no ``F.unfold``).

``geometry`` is ``(kernel, dilation, padding, stride)`` of a plain zero-padded convolution.

Example:
    >>> import torch
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> geometry = ((2, 2), (1, 1), (0, 0), (2, 2))
    >>> patches(x, geometry)[0, 0]  # the top-left 2x2 patch
    tensor([0., 1., 4., 5.])
    >>> torch.equal(unpatch(patches(x, geometry), geometry, (1, 4, 4)), x)  # no overlaps
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["patches", "unpatch"]


def patches(x: Tensor, geometry: tuple[Any, ...]) -> Tensor:
    """``(n, C, H, W) -> (n, P, C·kh·kw)``: the input patch of every output position.

    The values of ``F.unfold`` (transposed), from strided views and one copy: ``F.unfold`` is
    several times slower on large kernels and strides (a ResNet's 7x7 stride-2 stem).
    """
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = geometry
    v = F.pad(x, (pw, pw, ph, ph)).unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    v = v[..., ::dh, ::dw]  # (n, C, H', W', kh, kw)
    return v.permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], v.shape[2] * v.shape[3], -1)


def unpatch(cols: Tensor, geometry: tuple[Any, ...], shape: Sequence[int]) -> Tensor:
    """The adjoint of :func:`patches`: ``(n, P, C·kh·kw) -> (n, C, H, W)``, overlaps summed."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = geometry
    n, (c, h, w) = cols.shape[0], shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    blocks = cols.reshape(n, ho, wo, c, kh, kw).permute(0, 3, 4, 5, 1, 2)
    out = cols.new_zeros(n, c, h + 2 * ph + sh * kh, w + 2 * pw + sw * kw)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * ho, sh)
            out[:, :, rows, j * dw : j * dw + sw * wo : sw] += blocks[:, :, i, j]
    return out[:, :, ph : ph + h, pw : pw + w]
