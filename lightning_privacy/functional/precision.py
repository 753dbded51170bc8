"""Full float32 precision for the leakage products, whatever the user's speed settings.

The I2F inverts ``J Jᵀ``, whose condition number on real models runs to 1e8 and more: a product
that carries 10 mantissa bits instead of 23 moves its small eigenvalues, and with them the
estimate, by far more than 5 %. On a GPU, PyTorch runs cuDNN convolutions in TF32 by default
(``torch.backends.cudnn.allow_tf32``), and training scripts often switch matrix products to it
too (``torch.set_float32_matmul_precision("high")``) or call hooks under ``torch.autocast``.
:func:`full_precision` turns all three off for the duration of a measurement and puts them back
afterwards; on a CPU it changes nothing that CPU kernels read.

Example:
    >>> import torch
    >>> torch.backends.cudnn.allow_tf32 = True
    >>> with full_precision():
    ...     torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    (False, 'highest')
    >>> torch.backends.cudnn.allow_tf32
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["full_precision"]


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Within it: no TF32 (cuDNN or matrix products) and no autocast; restored on exit.

    Usable as a decorator (``@full_precision()``).

    Example:
        >>> import torch
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), full_precision():
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast("cpu", enabled=False), _no_cuda_autocast():
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(matmul)


def _no_cuda_autocast() -> contextlib.AbstractContextManager[object]:
    """``torch.autocast("cuda", enabled=False)`` where CUDA is built in, else nothing."""
    if torch.backends.cuda.is_built():
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()
