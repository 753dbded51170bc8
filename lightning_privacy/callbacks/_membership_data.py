"""The examples a membership audit scores: drawn once, read into memory, never written anywhere.

``MembershipAudit`` needs a fixed set of *members* (training examples) and *non-members*
(held-out examples). Each comes from a :class:`ExampleSource`: a map-style data set (the training
or validation data, or one the user passes), a batch the user passes, or a loader over an
iterable data set (read in order). :func:`draw_indices` picks which examples, from the audit's own
seed; :meth:`ExampleSource.read` reads them with the loader's ``collate_fn`` and splits them with
the ``ModelAdapter``. :func:`overlap` finds examples that are in both sets.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from lightning_privacy.adapters import ModelAdapter
    >>> source = ExampleSource.of(TensorDataset(torch.rand(30, 2), torch.arange(30) % 3))
    >>> indices = draw_indices(source.size, 12, seed=0)
    >>> x, y = source.read(indices, ModelAdapter())
    >>> tuple(x.shape), len(indices), overlap((x, y), (x[:3], y[:3]))
    ((12, 2), 12, 3)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from lightning_privacy.adapters import ModelAdapter
from lightning_privacy.functional.seeding import derive_seed

__all__ = ["ExampleSource", "draw_indices", "overlap"]


def _is_batch(value: Any) -> bool:
    """A batch of examples: a tuple/list of tensors or a dict with tensors (not a data set)."""
    if isinstance(value, Mapping):
        return any(isinstance(v, Tensor) for v in value.values())
    return (
        isinstance(value, (tuple, list))
        and len(value) >= 2
        and all(isinstance(v, Tensor) for v in value[:2])
    )


def _map_style(dataset: Any) -> bool:
    return hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")


@dataclass(frozen=True)
class ExampleSource:
    """Where members or non-members are read from.

    Attributes:
        kind: ``"dataset"`` (map-style, sampled by index), ``"batch"`` (a batch, sampled by
            index) or ``"loader"`` (an iterable data set: the first examples, in order).
        data: The data set, batch or loader.
        collate: How items of a data set become a batch (the loader's ``collate_fn``).
        size: How many examples it holds (``None`` for a loader).
    """

    kind: str
    data: Any
    collate: Callable[[list[Any]], Any] = default_collate
    size: int | None = None

    @staticmethod
    def of(value: Any, collate: Callable[[list[Any]], Any] | None = None) -> ExampleSource:
        """The source of a user's ``members=``/``nonmembers=`` value or of a ``DataLoader``.

        Raises:
            TypeError: For anything else, naming what is accepted.
        """
        if isinstance(value, DataLoader):
            fn = value.collate_fn or default_collate
            if _map_style(value.dataset):
                return ExampleSource("dataset", value.dataset, fn, len(value.dataset))  # type: ignore[arg-type]
            return ExampleSource("loader", value, fn, None)
        if _is_batch(value):
            return ExampleSource("batch", value, default_collate, _batch_size(value))
        if isinstance(value, Dataset) or _map_style(value):
            return ExampleSource("dataset", value, collate or default_collate, len(value))
        raise TypeError(
            "Expected a map-style Dataset, a DataLoader or a batch ((inputs, targets) or a dict "
            f"of tensors), but got {type(value).__name__}."
        )

    def read(
        self, indices: Tensor | None, adapter: ModelAdapter, limit: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` of the chosen examples, detached copies on the CPU.

        Args:
            indices: Which examples (``dataset``/``batch`` sources).
            adapter: Splits a batch into inputs and targets.
            limit: How many to read from a ``loader`` source.
        """
        if self.kind == "loader":
            return _read_loader(self.data, adapter, int(limit or 0))
        assert indices is not None
        if self.kind == "batch":
            inputs, targets = adapter.unpack(self.data)
            return _cpu(inputs[indices]), _cpu(targets[indices])
        items = [self.data[int(i)] for i in indices]
        inputs, targets = adapter.unpack(self.collate(items))
        return _cpu(inputs), _cpu(targets)


def _cpu(tensor: Any) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(
            f"Expected the adapter to split the examples into tensors, but got "
            f"{type(tensor).__name__}."
        )
    return tensor.detach().cpu().clone()


def _batch_size(batch: Any) -> int:
    values = batch.values() if isinstance(batch, Mapping) else batch
    return len(next(v for v in values if isinstance(v, Tensor)))


def _read_loader(loader: Any, adapter: ModelAdapter, limit: int) -> tuple[Tensor, Tensor]:
    """The first ``limit`` examples an iterable loader yields."""
    inputs: list[Tensor] = []
    targets: list[Tensor] = []
    count = 0
    for batch in loader:
        x, y = adapter.unpack(batch)
        inputs.append(_cpu(x))
        targets.append(_cpu(y))
        count += len(x)
        if count >= limit:
            break
    if not inputs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(inputs)[:limit], torch.cat(targets)[:limit]


def draw_indices(size: int, num: int, *, seed: int) -> Tensor:
    """``min(num, size)`` distinct indices below ``size``, sorted, from a generator of ``seed``.

    The generator is the audit's own (seeded from ``seed`` and a stream of its own), never the
    global RNG, so the sample does not depend on what else ran.

    Example:
        >>> draw_indices(10, 4, seed=0).tolist() == draw_indices(10, 4, seed=0).tolist()
        True
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, 0x4D454D42, size))
    return torch.randperm(size, generator=generator)[: min(num, size)].sort().values


def _digests(inputs: Tensor, targets: Tensor) -> list[bytes]:
    digests = []
    for x, y in zip(inputs, targets, strict=True):
        h = hashlib.blake2b(digest_size=16)
        h.update(x.contiguous().numpy().tobytes())
        h.update(y.contiguous().numpy().tobytes())
        digests.append(h.digest())
    return digests


def overlap(first: Sequence[Tensor], second: Sequence[Tensor]) -> int:
    """How many examples of ``second`` equal (inputs and target, bit for bit) one of ``first``.

    Example:
        >>> x = torch.arange(6.0).reshape(3, 2)
        >>> overlap((x, torch.zeros(3)), (x[1:], torch.zeros(2))), overlap((x, torch.zeros(3)),
        ...                                                            (x, torch.ones(3)))
        (2, 0)
    """
    seen = set(_digests(first[0], first[1]))
    return sum(d in seen for d in _digests(second[0], second[1]))
