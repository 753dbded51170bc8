"""Canaries for a one-run privacy audit (Steinke, Nasr and Jagielski 2023): :func:`with_canaries`.

``m`` canaries are made and each is put into the training set independently with probability ½;
which ones went in (the *inclusion vector*) is the secret the audit's attacker has to guess from
the trained model alone. ``CanaryAudit`` (:mod:`lightning_privacy.callbacks`) scores them at the
end of ``fit`` and turns the right guesses into an ε lower bound
(:func:`~lightning_privacy.functional.membership.one_run_epsilon_lower_bound`).

Two kinds:

* ``"mislabeled"``: ``m`` examples of the data set with a label drawn uniformly among the *other*
  classes (their correctly labelled originals are removed from training, whichever way the coin
  falls, so only the canary can be memorised);
* ``"input"``: ``m`` new inputs of uniform noise in the data's value range, with random labels.

The data set returned serves the base examples that are not canary sources, then the included
canaries, in the base data set's own item format (``(x, y, ...)`` tuples or dicts). Everything is
drawn from a generator seeded with ``seed``, never from the global RNG. The canaries live in
memory only; nothing is written anywhere.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> base = TensorDataset(torch.rand(100, 1, 4, 4), torch.arange(100) % 10)
    >>> train = with_canaries(base, num_canaries=20, kind="mislabeled", seed=0)
    >>> canaries = train.canaries
    >>> len(train) == 100 - 20 + int(canaries.included.sum()), canaries.inputs.shape
    (True, torch.Size([20, 1, 4, 4]))
    >>> bool((canaries.targets != base.tensors[1][canaries.source_indices]).all())
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_privacy._validation import check_choice, check_int, describe

__all__ = [
    "CANARY_KINDS",
    "Canaries",
    "CanaryDataset",
    "check_canaries",
    "find_canaries",
    "with_canaries",
]

#: The kinds of canaries :func:`with_canaries` makes.
CANARY_KINDS = ("mislabeled", "input")
_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
_TARGET_KEYS = ("y", "label", "labels", "target", "targets")


@dataclass(frozen=True)
class Canaries:
    """The canaries of a training set and the secret of which ones it contains.

    Attributes:
        inputs: ``(m, ...)`` the canaries' inputs.
        targets: ``(m,)`` their (wrong, for ``"mislabeled"``) labels.
        included: ``(m,)`` bool, the secret inclusion vector.
        kind: ``"mislabeled"`` or ``"input"``.
        seed: The seed they were drawn with.
        source_indices: For ``"mislabeled"``, the base data set's indices they were made from.
    """

    inputs: Tensor
    targets: Tensor
    included: Tensor
    kind: str
    seed: int
    source_indices: Tensor | None = None

    @property
    def num_canaries(self) -> int:
        """``m``."""
        return len(self.targets)


class CanaryDataset(Dataset[Any]):
    """A base data set minus the canary sources, plus the included canaries.

    Args:
        base: The user's data set (map-style).
        kept: Indices of ``base`` served first, in order.
        canaries: The canaries; the included ones are served after ``kept``.
        template: One item of ``base`` whose format the canary items copy.

    Attributes:
        canaries: The :class:`Canaries` (with the inclusion vector): keep it secret from the
            training code, hand it to ``CanaryAudit`` (which also finds it by itself).
    """

    def __init__(self, base: Dataset[Any], kept: Tensor, canaries: Canaries, template: Any) -> None:
        self.base = base
        self.kept = kept
        self.canaries = canaries
        self._included = torch.nonzero(canaries.included).flatten()
        self._template = template

    def __len__(self) -> int:
        return len(self.kept) + len(self._included)

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} examples")
        if index < len(self.kept):
            return self.base[int(self.kept[index])]
        which = int(self._included[index - len(self.kept)])
        template = self._template
        if self.canaries.source_indices is not None:
            template = self.base[int(self.canaries.source_indices[which])]
        return _replace(template, self.canaries.inputs[which], self.canaries.targets[which])


def _split_item(item: Any) -> tuple[Any, Any]:
    """``(input, target)`` of one data-set item: an ``(x, y, ...)`` sequence or a dict."""
    if isinstance(item, Mapping):
        x = next((item[k] for k in _INPUT_KEYS if k in item), None)
        y = next((item[k] for k in _TARGET_KEYS if k in item), None)
        if x is not None and y is not None:
            return x, y
    elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) >= 2:
        return item[0], item[1]
    raise TypeError(
        "Expected the data set's items to be (input, target, ...) sequences or dicts with input "
        f"keys {list(_INPUT_KEYS)} and target keys {list(_TARGET_KEYS)}, but got "
        f"{type(item).__name__}."
    )


def _replace(item: Any, x: Tensor, y: Tensor) -> Any:
    """``item`` with its input and target replaced, in the same format (and target type)."""
    _, old_target = _split_item(item)
    target: Any = y.clone() if isinstance(old_target, Tensor) else int(y)
    if isinstance(old_target, Tensor):
        target = target.to(old_target.dtype).reshape(old_target.shape)
    if isinstance(item, Mapping):
        out = dict(item)
        out[next(k for k in _INPUT_KEYS if k in item)] = x.clone()
        out[next(k for k in _TARGET_KEYS if k in item)] = target
        return out
    values = [x.clone(), target, *item[2:]]
    return tuple(values) if isinstance(item, tuple) else values


def _labels(dataset: Dataset[Any], indices: Tensor | None = None) -> Tensor:
    """The integer labels of ``dataset`` (of ``indices`` only, if given)."""
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, tuple) and len(tensors) >= 2:
        labels = tensors[1]
        return labels if indices is None else labels[indices]
    picks = range(len(dataset)) if indices is None else indices.tolist()  # type: ignore[arg-type]
    return torch.tensor([int(torch.as_tensor(_split_item(dataset[i])[1])) for i in picks])


def _mislabeled(
    dataset: Dataset[Any], m: int, num_classes: int | None, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """``m`` examples of ``dataset`` with a uniformly drawn wrong label; and their indices."""
    n = len(dataset)  # type: ignore[arg-type]
    sources = torch.randperm(n, generator=generator)[:m].sort().values
    if num_classes is None:
        num_classes = int(_labels(dataset).max()) + 1
    if num_classes < 2:
        raise ValueError(
            f"Expected at least 2 classes for mislabeled canaries, but got {num_classes}."
        )
    labels = _labels(dataset, sources).long()
    shift = torch.randint(1, num_classes, (m,), generator=generator)
    inputs = torch.stack([torch.as_tensor(_split_item(dataset[int(i)])[0]) for i in sources])
    return inputs, (labels + shift) % num_classes, sources


def _noise_inputs(
    dataset: Dataset[Any], m: int, num_classes: int | None, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``m`` uniform-noise inputs in the range of 64 sampled inputs, with random labels."""
    n = len(dataset)  # type: ignore[arg-type]
    probe = torch.randperm(n, generator=generator)[: min(n, 64)]
    samples = torch.stack([torch.as_tensor(_split_item(dataset[int(i)])[0]) for i in probe])
    if not samples.is_floating_point():
        raise TypeError(
            f"Expected continuous inputs for kind='input' canaries, but the data set's inputs are "
            f"{samples.dtype}; use kind='mislabeled'."
        )
    low, high = float(samples.min()), float(samples.max())
    shape = samples.shape[1:]
    inputs = low + (high - low) * torch.rand(m, *shape, generator=generator, dtype=samples.dtype)
    if num_classes is None:
        num_classes = int(_labels(dataset).max()) + 1
    return inputs, torch.randint(0, num_classes, (m,), generator=generator)


def with_canaries(
    dataset: Dataset[Any],
    *,
    num_canaries: int,
    kind: str = "mislabeled",
    seed: int = 0,
    num_classes: int | None = None,
) -> CanaryDataset:
    """The training set with ``num_canaries`` canaries, each included with probability ½.

    Args:
        dataset: A map-style data set of ``(input, target, ...)`` items or dicts (the usual keys).
        num_canaries: ``m``, how many canaries to make (at least 10; for ``"mislabeled"`` at most
            half the data set).
        kind: ``"mislabeled"`` (examples of the data set with a wrong label) or ``"input"``
            (uniform-noise inputs with random labels).
        seed: Seed of every draw (which examples, labels, noise and the inclusion coins).
        num_classes: The number of classes (default: the largest label + 1, read from the data).

    Returns:
        A :class:`CanaryDataset`; its ``canaries`` attribute holds the canaries and the secret
        inclusion vector.

    Raises:
        ValueError: For a kind, count or data set it cannot serve, naming the argument.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> base = TensorDataset(torch.rand(50, 3), torch.arange(50) % 5)
        >>> train = with_canaries(base, num_canaries=10, kind="input", seed=1)
        >>> len(train) - len(base) == int(train.canaries.included.sum())
        True
    """
    check_choice("kind", kind, CANARY_KINDS)
    check_int("seed", seed)
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(
            "Expected `dataset` to be a map-style data set (with __len__ and __getitem__), but got "
            f"{type(dataset).__name__}."
        )
    n = len(dataset)
    high = n // 2 if kind == "mislabeled" else None
    check_int("num_canaries", num_canaries, low=10, high=high)
    if num_classes is not None:
        check_int("num_classes", num_classes, low=2)
    generator = torch.Generator().manual_seed(seed)
    template = dataset[0]
    _split_item(template)
    sources: Tensor | None = None
    if kind == "mislabeled":
        inputs, targets, sources = _mislabeled(dataset, num_canaries, num_classes, generator)
        keep = torch.ones(n, dtype=torch.bool)
        keep[sources] = False
        kept = torch.nonzero(keep).flatten()
    else:
        inputs, targets = _noise_inputs(dataset, num_canaries, num_classes, generator)
        kept = torch.arange(n)
    included = torch.rand(num_canaries, generator=generator) < 0.5
    canaries = Canaries(inputs, targets, included, kind, seed, sources)
    return CanaryDataset(dataset, kept, canaries, template)


def find_canaries(dataset: Any) -> Canaries | None:
    """The :class:`Canaries` of a data set made by :func:`with_canaries`, through wrappers.

    Looks at ``dataset.canaries`` and then down ``.dataset`` attributes (``Subset``, Opacus's and
    Lightning's wrappers), so a ``DataLoader``'s data set can be given as is.

    Example:
        >>> import torch
        >>> from torch.utils.data import Subset, TensorDataset
        >>> train = with_canaries(TensorDataset(torch.rand(40, 2), torch.arange(40) % 4),
        ...                       num_canaries=10)
        >>> find_canaries(Subset(train, range(5))) is train.canaries, find_canaries([1, 2])
        (True, None)
    """
    seen = 0
    while dataset is not None and seen < 16:
        found = getattr(dataset, "canaries", None)
        if isinstance(found, Canaries):
            return found
        dataset, seen = getattr(dataset, "dataset", None), seen + 1
    return None


def check_canaries(value: Any) -> Canaries:
    """Validate a ``canaries=`` argument: a :class:`Canaries` or a data set holding one.

    Example:
        >>> try:
        ...     check_canaries([1, 2])
        ... except TypeError as err:
        ...     print(str(err)[-18:])
        got [1, 2] (list).
    """
    if isinstance(value, Canaries):
        return value
    found = find_canaries(value)
    if found is None:
        raise TypeError(
            "Expected `canaries` to be the Canaries (or the data set) made by "
            f"lightning_privacy.data.with_canaries, but got {describe(value)}."
        )
    return found
