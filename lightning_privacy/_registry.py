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
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


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
        """Build the component registered under ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The registered names, sorted (so a registry reads like the tuple of its names)."""
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
