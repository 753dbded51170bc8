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
from collections.abc import Mapping, Sequence
from typing import ClassVar

from torch import Generator, Tensor

from lightning_privacy.functional.defenses import add_noise


class GradientTransform(ABC):
    """Base class of gradient defenses.

    Attributes:
        provides_formal_dp: Whether this transform alone is a differentially private mechanism
            with a computable epsilon. Only clipping followed by calibrated Gaussian noise is.
        needs_global_view: Whether the result on one tensor depends on the other tensors (global
            norm clipping, global top-k). Such transforms must see all gradients at once.
        uses_randomness: Whether ``__call__`` draws from ``generator``. ``True`` unless a
            transform says otherwise, so a transform of unknown kind is never assumed
            deterministic.
    """

    provides_formal_dp: ClassVar[bool] = False
    needs_global_view: ClassVar[bool] = False
    uses_randomness: ClassVar[bool] = True

    @abstractmethod
    def __call__(
        self, gradients: Sequence[Tensor], *, generator: Generator | None = None
    ) -> list[Tensor]:
        """Return defended copies of ``gradients`` (same shapes, same order)."""


class AdditiveNoise(GradientTransform):
    """A defense that adds noise drawn independently of the gradient's values.

    The noise depends only on the shapes, dtypes and devices of the gradients, so it can be drawn
    before the gradient exists (``GradientDefense`` draws it in a background thread while the
    backward pass runs). ``__call__`` is :meth:`sample` followed by :meth:`add`, so a pipeline
    gives bitwise the same result whether its noise was drawn early or on the spot.

    Example:
        >>> import torch
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class PlusOne(AdditiveNoise):
        ...     def sample(self, like, *, generator=None):
        ...         return [torch.ones_like(t) for t in like]
        >>> PlusOne()([torch.zeros(2)])
        [tensor([1., 1.])]
    """

    @abstractmethod
    def sample(
        self, like: Sequence[Tensor], *, generator: Generator | None = None
    ) -> list[Tensor] | None:
        """Noise shaped like ``like`` (``None``: this transform adds nothing)."""

    def add(self, gradients: Sequence[Tensor], noise: Sequence[Tensor] | None) -> list[Tensor]:
        """``gradients + noise`` as new tensors; ``noise`` is consumed."""
        return add_noise(gradients, noise)

    def __call__(
        self, gradients: Sequence[Tensor], *, generator: Generator | None = None
    ) -> list[Tensor]:
        """Noisy copies of ``gradients``."""
        return self.add(gradients, self.sample(gradients, generator=generator))


DrawnNoise = Mapping[int, "list[Tensor] | None"]


def can_draw_noise_ahead(transforms: Sequence[GradientTransform]) -> bool:
    """Whether all of a pipeline's randomness is additive noise (so it can be drawn early).

    Example:
        >>> from lightning_privacy.defenses import GaussianNoise, GradientClipping, RandomPruning
        >>> can_draw_noise_ahead([GradientClipping(max_norm=1.0), GaussianNoise(std=0.1)])
        True
        >>> can_draw_noise_ahead([GaussianNoise(std=0.1), RandomPruning(ratio=0.5)])
        False
        >>> can_draw_noise_ahead([GradientClipping(max_norm=1.0)])  # nothing to draw
        False
    """
    noisy = [t for t in transforms if t.uses_randomness]
    return bool(noisy) and all(isinstance(t, AdditiveNoise) for t in noisy)


def draw_noise(
    transforms: Sequence[GradientTransform],
    like: Sequence[Tensor],
    *,
    generator: Generator | None = None,
) -> dict[int, list[Tensor] | None] | None:
    """Draw, in pipeline order, the noise of every :class:`AdditiveNoise` in ``transforms``.

    Consumes ``generator`` exactly as :func:`apply_transforms` would on gradients shaped like
    ``like``; pass the result as its ``noise`` argument to get bitwise the same output.

    Args:
        transforms: The pipeline.
        like: Tensors shaped like the gradients it will defend.
        generator: Source of randomness.

    Returns:
        ``{position in the pipeline: noise}``, or ``None`` when the pipeline draws no noise or
        some other transform draws randomness too (then nothing was drawn).

    Example:
        >>> import torch
        >>> from lightning_privacy.defenses import GaussianNoise, GradientClipping
        >>> pipeline = [GradientClipping(max_norm=1.0), GaussianNoise(std=0.1)]
        >>> grads = [torch.tensor([3.0, 4.0])]
        >>> noise = draw_noise(pipeline, grads, generator=torch.Generator().manual_seed(0))
        >>> early = apply_transforms(pipeline, grads, noise=noise)
        >>> now = apply_transforms(pipeline, grads, generator=torch.Generator().manual_seed(0))
        >>> sorted(noise), bool(torch.equal(early[0], now[0]))
        ([1], True)
    """
    if not can_draw_noise_ahead(transforms):
        return None
    return {
        i: t.sample(like, generator=generator)
        for i, t in enumerate(transforms)
        if isinstance(t, AdditiveNoise)
    }


def apply_transforms(
    transforms: Sequence[GradientTransform],
    gradients: Sequence[Tensor],
    *,
    generator: Generator | None = None,
    noise: DrawnNoise | None = None,
) -> list[Tensor]:
    """Apply ``transforms`` in order (a pipeline).

    Args:
        transforms: The pipeline.
        gradients: One tensor per parameter.
        generator: Source of randomness of the transforms that draw on the spot.
        noise: Noise drawn ahead by :func:`draw_noise` (consumed), by pipeline position.

    Returns:
        The defended gradients.

    Example:
        >>> import torch
        >>> apply_transforms([], [torch.zeros(1)])
        [tensor([0.])]
    """
    out = list(gradients)
    for i, transform in enumerate(transforms):
        if noise is not None and i in noise and isinstance(transform, AdditiveNoise):
            out = transform.add(out, noise[i])
        else:
            out = transform(out, generator=generator)
    return out
