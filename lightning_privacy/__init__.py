"""lightning-privacy: PyTorch Lightning callbacks against gradient leakage.

Layers (imports only point down):

1. :mod:`lightning_privacy.functional` -- pure tensor functions, no Lightning import.
2. Components -- :mod:`~lightning_privacy.defenses`, :mod:`~lightning_privacy.attacks`,
   :mod:`~lightning_privacy.accountants`, :mod:`~lightning_privacy.metrics`,
   :mod:`~lightning_privacy.leakage`.
3. :mod:`lightning_privacy.callbacks` -- thin Lightning adapters.

Example:
    >>> import lightning_privacy
    >>> lightning_privacy.__version__
    '0.1.0'
"""

__version__ = "0.1.0"
