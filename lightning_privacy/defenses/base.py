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

import itertools
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, ClassVar, NamedTuple

from torch import Generator, Tensor

from lightning_privacy.functional.defenses import add_noise


class DPRole(str, Enum):
    """The part a transform plays in a Gaussian mechanism (read by :func:`formal_mechanism`).

    * ``SENSITIVITY_BOUND``: the output's global L2 norm is at most ``transform.l2_bound``
      whatever the input (batch clipping).
    * ``GAUSSIAN_NOISE``: adds ``N(0, transform.std^2 I)`` drawn independently of the input.
    * ``NONE``: anything else (pruning, low-rank, Laplace noise, ...).
    """

    NONE = "none"
    SENSITIVITY_BOUND = "sensitivity_bound"
    GAUSSIAN_NOISE = "gaussian_noise"


class FormalMechanism(NamedTuple):
    """A pipeline that is a Gaussian mechanism: L2 bound ``max_norm``, noise std ``std``.

    Example:
        >>> max_norm, std = FormalMechanism(max_norm=1.0, std=2.0)
        >>> std / max_norm
        2.0
    """

    max_norm: float
    std: float


class GradientTransform(ABC):
    """Base class of gradient defenses.

    Attributes:
        provides_formal_dp: Whether this transform *alone* is a Gaussian mechanism with a
            computable epsilon; such a transform returns its parameters from :meth:`mechanism`.
            ``False`` for every built-in transform: only a pipeline with clipping immediately
            followed by Gaussian noise is one (see :func:`formal_mechanism`).
        dp_role: The transform's part in such a pipeline (:class:`DPRole`).
        needs_global_view: Whether the result on one tensor depends on the other tensors (global
            norm clipping, global top-k). Such transforms must see all gradients at once.
        uses_randomness: Whether ``__call__`` draws from ``generator``. ``True`` unless a
            transform says otherwise, so a transform of unknown kind is never assumed
            deterministic.
        strength: The name of the setting a sweep varies (``"std"``, ``"ratio"``, ...); a
            ``defenses:`` entry's ``strengths`` are values of it.
        sparsifies: Whether the transform sets entries to zero (pruning); ``GradientDefense``
            then logs the share of zeros.
    """

    provides_formal_dp: ClassVar[bool] = False
    dp_role: ClassVar[DPRole] = DPRole.NONE
    needs_global_view: ClassVar[bool] = False
    uses_randomness: ClassVar[bool] = True
    strength: ClassVar[str]
    sparsifies: ClassVar[bool] = False

    def mechanism(self) -> FormalMechanism | None:
        """This transform's Gaussian mechanism when :attr:`provides_formal_dp` (else ``None``)."""
        return None

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


def formal_mechanism(transforms: Sequence[GradientTransform]) -> FormalMechanism | None:
    """The Gaussian mechanism a pipeline implements, from its transforms' metadata, or ``None``.

    A pipeline is one when a transform :attr:`~GradientTransform.provides_formal_dp` alone, or
    when a :attr:`DPRole.SENSITIVITY_BOUND` transform (clipping to ``C``) is immediately followed
    by :attr:`DPRole.GAUSSIAN_NOISE` with ``std > 0``. Transforms before the bound do not change
    it (clipping bounds whatever they produce) and transforms after the noise are
    post-processing, so neither weakens the guarantee.

    Example:
        >>> from lightning_privacy.defenses import GaussianNoise, GradientClipping, MagnitudePruning
        >>> formal_mechanism([GradientClipping(max_norm=1.0), GaussianNoise(std=2.0)])
        FormalMechanism(max_norm=1.0, std=2.0)
        >>> formal_mechanism([GaussianNoise(std=2.0), GradientClipping(max_norm=1.0)]) is None
        True
        >>> formal_mechanism([GradientClipping(max_norm=1.0), GaussianNoise(std=2.0),
        ...                   MagnitudePruning(ratio=0.9)])  # pruning afterwards: post-processing
        FormalMechanism(max_norm=1.0, std=2.0)
    """
    pipeline = list(transforms)
    for transform in pipeline:
        if transform.provides_formal_dp:
            return transform.mechanism()
    for bound, noise in itertools.pairwise(pipeline):
        if (
            bound.dp_role is DPRole.SENSITIVITY_BOUND
            and noise.dp_role is DPRole.GAUSSIAN_NOISE
            and _attribute(noise, "std") > 0
        ):
            return FormalMechanism(_attribute(bound, "l2_bound"), _attribute(noise, "std"))
    return None


def _attribute(transform: GradientTransform, name: str) -> Any:
    """``transform.<name>``, which its :class:`DPRole` promises."""
    try:
        return float(getattr(transform, name))
    except AttributeError:
        raise TypeError(
            f"Expected {type(transform).__name__} (dp_role={transform.dp_role.value!r}) to "
            f"define `{name}`, but it has none."
        ) from None


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
