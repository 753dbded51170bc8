"""Layer 1: pure functions on tensors and modules. No Lightning import, no hidden state.

Every sampling function takes ``generator: torch.Generator | None``.

Example:
    >>> import sys, lightning_privacy.functional
    >>> "lightning" in sys.modules or "lightning_privacy.functional" in sys.modules
    True
"""

from lightning_privacy.functional.gradients import parameter_gradients, select_parameters

__all__ = ["parameter_gradients", "select_parameters"]
