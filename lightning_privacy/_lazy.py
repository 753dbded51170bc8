"""Names a package re-exports from a Lightning module, imported only when first used.

``lightning_privacy.models`` and ``lightning_privacy.data`` hold plain-torch models and data next
to their Lightning wrappers (``LitClassifier``, the data modules). Importing the package, or
one of its plain-torch modules, must not import Lightning (the layering rule), so the wrappers are
resolved on first attribute access (PEP 562).

Example:
    >>> __getattr__ = lazy_exports("lightning_privacy.models", {"LitClassifier": ".lit"})
    >>> __getattr__("LitClassifier").__name__
    'LitClassifier'
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``exports[name]`` (relative to ``package``) on use.

    Args:
        package: The package's ``__name__``.
        exports: ``{attribute: module}``, the module relative (``".lit"``) or absolute.
    """

    def __getattr__(name: str) -> Any:  # noqa: N807 (the module attribute hook's own name)
        where = exports.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where, package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
