"""The gradient defenses as configured components (frozen dataclasses).

Each component wraps one function of :mod:`lightning_privacy.functional.defenses`, validates its
settings once in ``__post_init__`` and declares two facts used by the callbacks:

* ``provides_formal_dp`` -- ``False`` for every component on its own; ``dp_role`` marks
  ``GradientClipping`` as a sensitivity bound and ``GaussianNoise`` as Gaussian noise, so the
  pipeline ``[GradientClipping(max_norm=C), GaussianNoise(std=sigma * C)]`` is recognised as a
  Gaussian mechanism with a computable epsilon
  (:func:`~lightning_privacy.defenses.formal_mechanism`, which ``GradientDefense`` accounts for).
* ``strength`` -- the setting a sweep varies (``std``, ``ratio``, ``rank``, ...).
* ``needs_global_view`` -- ``True`` when the result for one parameter depends on the others
  (global-norm clipping, global top-k), so the transform must see the whole gradient at once.

Example:
    >>> import torch
    >>> from lightning_privacy.defenses import GradientClipping, GaussianNoise, apply_transforms
    >>> pipeline = [GradientClipping(max_norm=1.0), GaussianNoise(std=0.0)]
    >>> apply_transforms(pipeline, [torch.tensor([3.0, 4.0])])
    [tensor([0.6000, 0.8000])]
    >>> GradientClipping(max_norm=1.0).needs_global_view, GaussianNoise(std=0.1).needs_global_view
    (True, False)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Generator, Tensor

from lightning_privacy._registry import Registry
from lightning_privacy._validation import check_choice, check_float, check_int
from lightning_privacy.defenses.base import AdditiveNoise, DPRole, GradientTransform
from lightning_privacy.functional import defenses as F

DEFENSES: Registry[GradientTransform] = Registry("defense")


@DEFENSES.register("gaussian_noise")
@dataclass(frozen=True, kw_only=True)
class GaussianNoise(AdditiveNoise):
    """Add i.i.d. Gaussian noise ``N(0, std^2)`` to every gradient entry.

    Without clipping the sensitivity is unbounded, so this alone gives no formal guarantee.

    Args:
        std: Noise standard deviation (>= 0), in gradient units.

    Example:
        >>> import torch
        >>> noise = GaussianNoise(std=0.5)
        >>> out = noise([torch.zeros(3)], generator=torch.Generator().manual_seed(0))
        >>> out[0].shape, noise.provides_formal_dp
        (torch.Size([3]), False)
    """

    std: float
    strength: ClassVar[str] = "std"
    dp_role: ClassVar[DPRole] = DPRole.GAUSSIAN_NOISE

    def __post_init__(self) -> None:
        object.__setattr__(self, "std", check_float("std", self.std, low=0.0))

    def sample(
        self, like: Sequence[Tensor], *, generator: Generator | None = None
    ) -> list[Tensor] | None:
        """The noise (``None`` for ``std=0``), see :func:`~.functional.gaussian_noise_sample`."""
        return F.gaussian_noise_sample(like, std=self.std, generator=generator)


@DEFENSES.register("laplace_noise")
@dataclass(frozen=True, kw_only=True)
class LaplaceNoise(AdditiveNoise):
    """Add i.i.d. Laplace noise of scale ``b`` (variance ``2 b^2``) to every entry.

    The Gaussian-mechanism accountants do not cover Laplace noise: no epsilon is reported.

    Args:
        scale: The Laplace scale ``b`` (>= 0).

    Example:
        >>> LaplaceNoise(scale=0.1)
        LaplaceNoise(scale=0.1)
    """

    scale: float
    strength: ClassVar[str] = "scale"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_float("scale", self.scale, low=0.0))

    def sample(
        self, like: Sequence[Tensor], *, generator: Generator | None = None
    ) -> list[Tensor] | None:
        """The noise (``None`` for ``scale=0``), see :func:`~.functional.laplace_noise_sample`."""
        return F.laplace_noise_sample(like, scale=self.scale, generator=generator)


@DEFENSES.register("gradient_clipping")
@dataclass(frozen=True, kw_only=True)
class GradientClipping(GradientTransform):
    """Rescale the whole gradient so its global L2 norm is at most ``max_norm``.

    This is *batch* clipping (of the gradient the transform is given), not per-sample clipping.
    Followed by ``GaussianNoise(std=sigma * max_norm)`` it is a Gaussian mechanism with
    sensitivity ``2 * max_norm`` per example per epoch; see ``BatchClippingAccountant``.

    Args:
        max_norm: The threshold ``C`` (> 0).

    Example:
        >>> import torch
        >>> GradientClipping(max_norm=1.0)([torch.tensor([0.0, 2.0])])
        [tensor([0.0000, 1.0000])]
    """

    max_norm: float
    strength: ClassVar[str] = "max_norm"
    dp_role: ClassVar[DPRole] = DPRole.SENSITIVITY_BOUND
    uses_randomness: ClassVar[bool] = False
    needs_global_view: ClassVar[bool] = True

    def __post_init__(self) -> None:
        value = check_float("max_norm", self.max_norm, low=0.0, low_open=True)
        object.__setattr__(self, "max_norm", value)

    @property
    def l2_bound(self) -> float:
        """The output's global L2 norm is at most ``max_norm`` (``DPRole.SENSITIVITY_BOUND``)."""
        return self.max_norm

    def __call__(
        self, gradients: Sequence[Tensor], *, generator: Generator | None = None
    ) -> list[Tensor]:
        """Clipped copies of ``gradients``."""
        return F.clip_by_global_norm(gradients, max_norm=self.max_norm)


@DEFENSES.register("magnitude_pruning")
@dataclass(frozen=True, kw_only=True)
class MagnitudePruning(GradientTransform):
    """Keep the largest ``1 - ratio`` fraction of entries by magnitude, zero the rest.

    Args:
        ratio: Fraction of entries zeroed, in ``[0, 1)`` (the DLG paper's 0.2-0.9 range).
        scope: ``"per_tensor"`` (default: each parameter keeps its own top fraction) or
            ``"global"`` (one top-k over the whole gradient; needs the global view).

    Example:
        >>> import torch
        >>> MagnitudePruning(ratio=0.5)([torch.tensor([1.0, -4.0, 0.5, 2.0])])
        [tensor([ 0., -4.,  0.,  2.])]
        >>> MagnitudePruning(ratio=0.5, scope="global").needs_global_view
        True
    """

    ratio: float
    scope: str = "per_tensor"
    strength: ClassVar[str] = "ratio"
    sparsifies: ClassVar[bool] = True
    uses_randomness: ClassVar[bool] = False

    def __post_init__(self) -> None:
        ratio = check_float("ratio", self.ratio, low=0.0, high=1.0, high_open=True)
        object.__setattr__(self, "ratio", ratio)
        check_choice("scope", self.scope, F.PRUNING_SCOPES)

    @property
    def needs_global_view(self) -> bool:  # type: ignore[override]
        """``True`` for ``scope="global"``."""
        return self.scope == "global"

    def __call__(
        self, gradients: Sequence[Tensor], *, generator: Generator | None = None
    ) -> list[Tensor]:
        """Pruned copies of ``gradients``."""
        return F.magnitude_pruning(gradients, ratio=self.ratio, scope=self.scope)


@DEFENSES.register("random_pruning")
@dataclass(frozen=True, kw_only=True)
class RandomPruning(GradientTransform):
    """Zero each entry independently with probability ``ratio`` (no rescaling).

    Args:
        ratio: Probability of zeroing an entry, in ``[0, 1)``.

    Example:
        >>> RandomPruning(ratio=0.5).needs_global_view
        False
    """

    ratio: float
    strength: ClassVar[str] = "ratio"
    sparsifies: ClassVar[bool] = True

    def __post_init__(self) -> None:
        ratio = check_float("ratio", self.ratio, low=0.0, high=1.0, high_open=True)
        object.__setattr__(self, "ratio", ratio)

    def __call__(
        self, gradients: Sequence[Tensor], *, generator: Generator | None = None
    ) -> list[Tensor]:
        """Pruned copies of ``gradients``."""
        return F.random_pruning(gradients, ratio=self.ratio, generator=generator)


@DEFENSES.register("low_rank")
@dataclass(frozen=True, kw_only=True)
class LowRankFiltering(GradientTransform):
    """Project each gradient of dimension >= 2 onto its top-``rank`` singular directions.

    The gradient is reshaped to ``(shape[0], -1)`` before the SVD. 1-D gradients (biases, norm
    scales) pass unchanged -- see :func:`lightning_privacy.functional.low_rank`.

    Args:
        rank: Number of singular values kept (>= 1).

    Example:
        >>> import torch
        >>> out = LowRankFiltering(rank=1)([torch.eye(3)])
        >>> torch.linalg.matrix_rank(out[0]).item()
        1
    """

    rank: int
    strength: ClassVar[str] = "rank"
    uses_randomness: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_int("rank", self.rank, low=1)

    def __call__(
        self, gradients: Sequence[Tensor], *, generator: Generator | None = None
    ) -> list[Tensor]:
        """Filtered copies of ``gradients``."""
        return F.low_rank(gradients, rank=self.rank)


def create_defense(name: str, **kwargs: Any) -> GradientTransform:
    """Build a registered defense by name.

    Args:
        name: One of :func:`list_defenses`.
        **kwargs: The component's settings.

    Raises:
        ValueError: For an unknown name (with the closest match) or invalid settings.

    Example:
        >>> create_defense("gaussian_noise", std=0.01)
        GaussianNoise(std=0.01)
        >>> create_defense("gausian_noise", std=0.01)
        Traceback (most recent call last):
        ...
        ValueError: Unknown defense 'gausian_noise'. Did you mean 'gaussian_noise'? ...
    """
    return DEFENSES.create(name, **kwargs)


def list_defenses() -> list[str]:
    """Names accepted by :func:`create_defense`.

    Example:
        >>> list_defenses()  # doctest: +NORMALIZE_WHITESPACE
        ['gaussian_noise', 'gradient_clipping', 'laplace_noise', 'low_rank', 'magnitude_pruning',
         'random_pruning']
    """
    return DEFENSES.names()
