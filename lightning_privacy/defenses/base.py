"""The interface every gradient defense implements.

A defense is a frozen dataclass whose ``__call__`` maps a sequence of gradient tensors to a new
list of tensors of the same shapes. It never mutates its input and draws randomness only from the
``generator`` it is given, so the same transform can run in a callback, a DDP communication hook,
an attack simulation and the I2F estimator and mean the same thing everywhere.

Example:
    >>> import torch
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Halve(GradientTransform):
    ...     def __call__(self, gradients, *, generator=None):
    ...         return [g / 2 for g in gradients]
    >>> Halve()([torch.ones(2)])[0]
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from torch import Generator, Tensor


class GradientTransform(ABC):
    """Base class of gradient defenses.

    Attributes:
        provides_formal_dp: Whether this transform alone is a differentially private mechanism
            with a computable epsilon. Only clipping followed by calibrated Gaussian noise is.
        needs_global_view: Whether the result on one tensor depends on the other tensors (global
            norm clipping, global top-k). Such transforms must see all gradients at once.
    """

    provides_formal_dp: ClassVar[bool] = False
    needs_global_view: ClassVar[bool] = False

    @abstractmethod
    def __call__(
        self, gradients: Sequence[Tensor], *, generator: Generator | None = None
    ) -> list[Tensor]:
        """Return defended copies of ``gradients`` (same shapes, same order)."""


def apply_transforms(
    transforms: Sequence[GradientTransform],
    gradients: Sequence[Tensor],
    *,
    generator: Generator | None = None,
) -> list[Tensor]:
    """Apply ``transforms`` in order (a pipeline).

    Example:
        >>> import torch
        >>> apply_transforms([], [torch.zeros(1)])
        [tensor([0.])]
    """
    out = list(gradients)
    for transform in transforms:
        out = transform(out, generator=generator)
    return out
