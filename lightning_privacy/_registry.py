"""One generic name -> component registry used by defenses, attacks, accountants and metrics.

Example:
    >>> from lightning_privacy._registry import Registry
    >>> shapes = Registry("shape")
    >>> @shapes.register("square")
    ... class Square:
    ...     def __init__(self, side: float = 1.0):
    ...         self.side = side
    >>> shapes.create("square", side=2.0).side
    2.0
    >>> shapes.names(), "square" in shapes, list(shapes)
    (['square'], True, ['square'])
    >>> shapes.create("sqare")
    Traceback (most recent call last):
    ...
    ValueError: Unknown shape 'sqare'. Did you mean 'square'? Available: 'square'.
    >>> shapes.create("square", sides=2.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: Unknown argument `sides` for the shape 'square'. Did you mean 'side'? Allowed: ...
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: Names people write for an argument that this package spells differently.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "sigma": ("std", "noise_multiplier", "scale"),
    "stddev": ("std",),
    "noise_std": ("std",),
    "noise": ("std", "scale", "noise_multiplier"),
    "b": ("scale",),
    "clip": ("max_norm", "max_grad_norm"),
    "clip_norm": ("max_norm", "max_grad_norm"),
    "c": ("max_norm", "max_grad_norm"),
    "threshold": ("max_norm", "max_grad_norm"),
    "sparsity": ("ratio",),
    "prune_ratio": ("ratio",),
    "rate": ("ratio",),
    "k": ("rank",),
    "iterations": ("max_iterations",),
    "steps": ("max_iterations",),
}


def suggestion(name: str, allowed: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the allowed name closest to ``name`` (or a synonym), or ``""``.

    Example:
        >>> suggestion("sigma", ["std"]), suggestion("stdd", ["std", "ratio"]), suggestion("q", [])
        (" Did you mean 'std'?", " Did you mean 'std'?", '')
    """
    options = [str(a) for a in allowed]
    synonyms = [s for s in SYNONYMS.get(str(name).lower(), ()) if s in options]
    close = synonyms or difflib.get_close_matches(str(name), options, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _arguments(factory: Callable[..., Any]) -> tuple[list[str], list[str]] | None:
    """A factory's keyword names and required ones; ``None`` if it takes any (``**kwargs``)."""
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in parameters if p.kind in keyword]
    required = [p.name for p in parameters if p.kind in keyword and p.default is p.empty]
    return names, required


class Registry(Generic[T]):
    """Map names to component factories and build them with a helpful error on typos.

    Args:
        kind: What the registry holds, used in messages (``"defense"``, ``"attack"``, ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that registers a factory (usually a class) under ``name``."""

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"A {self.kind} named {name!r} is already registered.")
            self._entries[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., T]:
        """Return the factory for ``name`` or raise ``ValueError`` with a suggestion."""
        if not isinstance(name, str) or name not in self._entries:
            close = difflib.get_close_matches(str(name), self._entries, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            available = ", ".join(repr(n) for n in self.names())
            raise ValueError(f"Unknown {self.kind} {name!r}.{hint} Available: {available}.")
        return self._entries[name]

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the component registered under ``name`` with ``kwargs``.

        Raises:
            ValueError: For an unknown ``name`` (with the closest match).
            TypeError: For an argument the component does not take (naming the allowed ones and
                the closest) or a required one missing, before the component is built.
        """
        factory = self.get(name)
        arguments = _arguments(factory)
        if arguments is not None:
            names, required = arguments
            allowed = ", ".join(repr(n) for n in names) or "none"
            for key in kwargs:
                if key not in names:
                    raise TypeError(
                        f"Unknown argument `{key}` for the {self.kind} {name!r}."
                        f"{suggestion(key, names)} Allowed: {allowed}."
                    )
            missing = [n for n in required if n not in kwargs]
            if missing:
                raise TypeError(
                    f"Missing argument(s) {', '.join(f'`{n}`' for n in missing)} for the "
                    f"{self.kind} {name!r}. Allowed: {allowed}."
                )
        return factory(**kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The registered names, sorted (so a registry reads like the tuple of its names)."""
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
