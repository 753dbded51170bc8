"""What ``GradientDefense`` releases: the count its ε composes, and steps that bypass it.

Batch clipping + Gaussian noise is one Gaussian mechanism per *release* (a defended optimizer
step). How many releases one example takes part in per epoch decides the ε:

* the optimizer steps a batch makes (one in automatic optimization, however many a manual
  ``training_step`` makes: a batch stepped three times, or two optimizers each stepped once, is
  three or two releases of the same examples) -- counted as they happen;
* how often the sampler can draw one example per epoch (:func:`draws_per_epoch`): once for a
  shuffle or sequence without replacement, ``ceil(S / N)`` for ``S > N`` samples without
  replacement, and no bound (every release of the epoch may contain it) with replacement or for
  a sampler this module does not know.

:class:`ReleaseCounter` turns both into ``releases_per_epoch`` for
:class:`~lightning_privacy.accountants.BatchClippingAccountant`, and :class:`RawStepGuard` refuses
an optimizer step whose gradient the defense never saw (manual optimization stepping the raw
optimizer from ``self.optimizers(use_pl_optimizer=False)``), before the update is applied.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, RandomSampler, TensorDataset
    >>> data = TensorDataset(torch.zeros(10, 1))
    >>> draws_per_epoch(DataLoader(data, batch_size=2, shuffle=True))
    (1, 'a shuffle without replacement: each example is in at most one batch per epoch')
    >>> twice = RandomSampler(data, num_samples=20)
    >>> draws_per_epoch(DataLoader(data, batch_size=2, sampler=twice))[0]
    2
    >>> draws_per_epoch(DataLoader(data, sampler=RandomSampler(data, replacement=True)))[0] is None
    True
"""

from __future__ import annotations

import math
from collections.abc import Sized
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

__all__ = ["RawStepGuard", "ReleaseCounter", "draws_per_epoch"]

_ONCE = "each example is in at most one batch per epoch"


def _size(data: Any) -> int | None:
    return len(data) if isinstance(data, Sized) else None


def _sampler_draws(sampler: Any, n: int) -> tuple[int | None, str]:
    """How often ``sampler`` can draw one of ``n`` examples per epoch, and why."""
    if isinstance(sampler, SequentialSampler):
        return 1, f"a sequence without replacement: {_ONCE}"
    if isinstance(sampler, RandomSampler) and not sampler.replacement:
        draws = max(1, math.ceil(sampler.num_samples / n))
        if draws == 1:
            return 1, f"a shuffle without replacement: {_ONCE}"
        return draws, (
            f"{sampler.num_samples} samples of N={n} without replacement: an example is in up to "
            f"{draws} batches per epoch"
        )
    if isinstance(sampler, SubsetRandomSampler):
        counts: dict[int, int] = {}
        for index in sampler.indices:
            counts[int(index)] = counts.get(int(index), 0) + 1
        draws = max(counts.values(), default=1)
        return draws, f"a subset drawing each index up to {draws} time(s) per epoch"
    if type(sampler) is DistributedSampler:
        draws = max(1, math.ceil(sampler.total_size / n))
        return draws, f"a DistributedSampler: an example is in up to {draws} batch(es) per epoch"
    if isinstance(sampler, WeightedRandomSampler) and not sampler.replacement:
        return 1, f"weighted sampling without replacement: {_ONCE}"
    why = (
        "sampling with replacement"
        if getattr(sampler, "replacement", False)
        else f"the sampler {type(sampler).__name__}, whose draws per example are unknown"
    )
    return None, f"{why}: an example may be in every batch of an epoch"


def draws_per_epoch(loader: Any) -> tuple[int | None, str]:
    """The most batches of one epoch one example can be drawn into (``None``: no bound), and why.

    Args:
        loader: The train ``DataLoader`` (anything else has no known bound).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> draws_per_epoch(DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2))[0]
        1
    """
    n = _size(getattr(loader, "dataset", None))
    batch_sampler = getattr(loader, "batch_sampler", None)
    if n is None or n == 0 or batch_sampler is None:
        return None, "a loader without a sized data set and sampler: no bound is known"
    if type(batch_sampler) is not BatchSampler:
        name = type(batch_sampler).__name__
        return None, f"the batch sampler {name}, whose draws per example are unknown"
    return _sampler_draws(batch_sampler.sampler, n)


class ReleaseCounter:
    """Counts the defended optimizer steps per batch and per epoch; gives releases per epoch.

    Args:
        draws: :func:`draws_per_epoch`'s bound (``None``: every release of an epoch counts).

    Example:
        >>> counter = ReleaseCounter(draws=1)
        >>> for _ in range(4):  # four batches, each stepped three times (manual optimization)
        ...     counter.batch_start()
        ...     for _ in range(3):
        ...         counter.release()
        ...     counter.batch_end()
        >>> counter.epoch_end()
        3
        >>> ReleaseCounter(draws=None).predicted(steps_per_epoch=8, steps_per_batch=1)
        8
    """

    def __init__(self, draws: int | None) -> None:
        self.draws = draws
        self._batch = 0
        self._max_batch = 0
        self._epoch = 0
        self.last: int | None = None

    def batch_start(self) -> None:
        """A training batch begins."""
        self._batch = 0

    def release(self) -> None:
        """One defended optimizer step."""
        self._batch += 1
        self._epoch += 1

    def batch_end(self) -> None:
        """The batch ended (its optimizer steps are done)."""
        self._max_batch = max(self._max_batch, self._batch)
        self._batch = 0

    def epoch_end(self) -> int:
        """The most releases of the ending epoch one example took part in; starts a new epoch."""
        self._max_batch = max(self._max_batch, self._batch)
        if self.draws is None:
            releases = self._epoch
        else:
            releases = min(self._epoch, self._max_batch * self.draws)
        self._batch = self._max_batch = self._epoch = 0
        self.last = releases
        return releases

    def predicted(self, *, steps_per_epoch: int, steps_per_batch: int) -> int:
        """Releases per example of the coming epoch: the last epoch's, else a plan's."""
        if self.last is not None:
            return max(1, self.last)
        per_epoch = max(1, steps_per_epoch * steps_per_batch)
        if self.draws is None:
            return per_epoch
        return max(1, min(per_epoch, steps_per_batch * self.draws))


class RawStepGuard:
    """Refuses an optimizer step whose gradient ``GradientDefense`` never saw.

    Lightning calls ``on_before_optimizer_step`` (where the defense acts) for every step of a
    ``LightningOptimizer``; a manual ``training_step`` that steps the raw optimizer
    (``self.optimizers(use_pl_optimizer=False)``) skips it, and its update would be undefended.
    A step pre-hook on every optimizer raises before such a step is applied; a post-hook catches
    a raw step made with a closure of its own (its closure runs inside ``step``).

    Args:
        owner: The callback's name, for messages.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.ones(1))
        >>> sgd = torch.optim.SGD([p], lr=0.1)
        >>> guard = RawStepGuard("GradientDefense")
        >>> guard.attach([sgd])
        >>> p.grad = torch.ones(1)
        >>> guard.defended(sgd)
        >>> sgd.step()  # announced: allowed
        >>> try:
        ...     sgd.step()
        ... except RuntimeError as err:
        ...     print(str(err)[:80])
        GradientDefense: optimizer.step() on SGD ran without on_before_optimizer_step, s
        >>> guard.detach()
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._announced: set[int] = set()
        self._handles: list[Any] = []

    def attach(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Hook every optimizer's ``step``."""
        self.detach()
        for optimizer in optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._before))
            self._handles.append(optimizer.register_step_post_hook(self._after))

    def defended(self, optimizer: torch.optim.Optimizer) -> None:
        """The defense has just defended ``optimizer``'s gradient for its coming step."""
        self._announced.add(id(optimizer))

    def reset(self) -> None:
        """Forget announcements (a batch begins; a step the AMP scaler skipped is not carried)."""
        self._announced.clear()

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._announced.clear()

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # ``args`` are those of ``step`` itself: ``(optimizer, closure?)``
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None and id(optimizer) not in self._announced:
            raise self._error(optimizer, applied=False)

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) not in self._announced:
            raise self._error(optimizer, applied=True)
        self._announced.discard(id(optimizer))

    def _error(self, optimizer: torch.optim.Optimizer, *, applied: bool) -> RuntimeError:
        what = (
            "one undefended update was applied"
            if applied
            else "the step was refused before its update"
        )
        return RuntimeError(
            f"{self.owner}: optimizer.step() on {type(optimizer).__name__} ran without "
            "on_before_optimizer_step, so its gradient was never defended "
            f"({what}). A manual training_step must step the optimizers Lightning wraps: "
            "`opt = self.optimizers()` (not `self.optimizers(use_pl_optimizer=False)`), then "
            "`opt.step()`."
        )
