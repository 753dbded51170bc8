"""Draw a pipeline's additive noise for the coming optimizer step in a background thread.

Gaussian and Laplace noise depend only on the shapes of the gradients, not on their values, so
the noise of step ``s`` can be drawn while step ``s``'s forward and backward passes run. On a CPU
the draw (one random number per parameter, single-threaded in PyTorch) is the whole cost of a
noise defense; drawn ahead it overlaps with the model's work instead of adding to it. The draw
uses a generator seeded exactly as the on-the-spot path seeds its own, so the noise is bitwise
the same either way; a draw that does not match the step (another step number, other
parameters, shapes or dtypes) is discarded and the noise is drawn on the spot.

Example:
    >>> import torch
    >>> from lightning_privacy.defenses import GaussianNoise, apply_transforms
    >>> pipeline = (GaussianNoise(std=0.1),)
    >>> params = [torch.nn.Parameter(torch.zeros(3))]
    >>> ahead = NoiseAhead(pipeline)
    >>> key = noise_key(7, params, params)
    >>> ahead.start(key, params, seed=123)
    >>> noise = ahead.take(key)
    >>> grads = [torch.ones(3)]
    >>> early = apply_transforms(pipeline, grads, noise=noise)
    >>> now = apply_transforms(pipeline, grads, generator=torch.Generator().manual_seed(123))
    >>> bool(torch.equal(early[0], now[0]))
    True
    >>> ahead.close()
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from lightning_privacy.defenses.base import DrawnNoise, GradientTransform, draw_noise


def noise_key(step: int, params: Sequence[Tensor], like: Sequence[Tensor]) -> Hashable:
    """What a draw must match to be used: the step, and each parameter's shape, dtype, device.

    Args:
        step: The optimizer step (``trainer.global_step``).
        params: The defended parameters, in order.
        like: Their gradients (or the parameters themselves before the gradients exist).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> noise_key(0, [p], [p]) == noise_key(0, [p], [torch.ones(2)])
        True
    """
    return step, tuple(
        (id(p), tuple(t.shape), t.dtype, t.device) for p, t in zip(params, like, strict=True)
    )


class NoiseAhead:
    """One pending draw of a pipeline's noise, computed in a single background thread.

    Args:
        transforms: The pipeline; only its :class:`~lightning_privacy.defenses.AdditiveNoise`
            members are drawn (see :func:`~lightning_privacy.defenses.draw_noise`).

    Example:
        >>> from lightning_privacy.defenses import GaussianNoise
        >>> ahead = NoiseAhead((GaussianNoise(std=1.0),))
        >>> ahead.take(noise_key(0, [], [])) is None  # nothing was started
        True
    """

    def __init__(self, transforms: Sequence[GradientTransform]) -> None:
        self.transforms = tuple(transforms)
        self._pool: ThreadPoolExecutor | None = None
        self._job: tuple[Hashable, Future[Any]] | None = None

    def start(self, key: Hashable, like: Sequence[Tensor], *, seed: int) -> None:
        """Begin drawing the noise for ``key`` (a no-op if that draw is already under way)."""
        if self._job is not None and self._job[0] == key:
            return
        self.drop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lp-noise-ahead")
        self._job = (key, self._pool.submit(self._draw, list(like), seed))

    def _draw(self, like: list[Tensor], seed: int) -> DrawnNoise | None:
        generator = torch.Generator(device=like[0].device)
        generator.manual_seed(seed)
        return draw_noise(self.transforms, like, generator=generator)

    def take(self, key: Hashable) -> DrawnNoise | None:
        """The finished draw if it was started for ``key``, else ``None``; clears it either way."""
        job, self._job = self._job, None
        if job is None:
            return None
        noise = job[1].result()
        return noise if job[0] == key else None

    def drop(self) -> None:
        """Wait for an unused draw (so no thread outlives the step) and discard it."""
        job, self._job = self._job, None
        if job is not None:
            job[1].exception()  # waits; a failed draw that is never used is not an error

    def close(self) -> None:
        """Drop any pending draw and stop the thread."""
        self.drop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the thread (e.g. for ``ddp_spawn``): a copy starts idle."""
        return {"transforms": self.transforms, "_pool": None, "_job": None}
