"""lightning-privacy: PyTorch Lightning callbacks against gradient leakage.

Layers (imports only point down; ``tests/test_layering.py`` enforces it, ``docs/ARCHITECTURE.md``
explains it):

1. :mod:`lightning_privacy.functional` -- pure tensor functions, no Lightning import.
2. Components -- :mod:`~lightning_privacy.defenses`, :mod:`~lightning_privacy.attacks`,
   :mod:`~lightning_privacy.accountants`, :mod:`~lightning_privacy.metrics`,
   :mod:`~lightning_privacy.leakage`, :mod:`~lightning_privacy.engines`,
   :mod:`~lightning_privacy.adapters` (:class:`ModelAdapter`: how observers replay the user's
   loss), and the plain-torch models and embedded data; no Lightning import either.
3. Lightning integration -- :mod:`lightning_privacy.callbacks` (thin adapters),
   :mod:`~lightning_privacy.sweep`, ``report``, ``cli``, ``models.lit``, ``data.datamodules``.

Example:
    >>> import lightning_privacy
    >>> lightning_privacy.__version__, lightning_privacy.ModelAdapter().loss_source
    ('0.1.0', 'given')
"""

from typing import TYPE_CHECKING

from lightning_privacy._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_privacy.adapters import ModelAdapter

__version__ = "0.1.0"
__all__ = ["ModelAdapter", "__version__"]

# Imported on first use, so that `import lightning_privacy` (the command line) stays light.
__getattr__ = lazy_exports(__name__, {"ModelAdapter": ".adapters"})
