"""Reference models: the DLG LeNet, a CIFAR-style ResNet-18 and the LitClassifier module.

``LitClassifier`` (Lightning) is imported on first use; the plain-torch models import no Lightning.

Example:
    >>> from lightning_privacy.models import LeNetDLG, LitClassifier
    >>> LitClassifier(LeNetDLG()).lr
    0.05
"""

from typing import TYPE_CHECKING

from lightning_privacy._lazy import lazy_exports
from lightning_privacy.models.lenet import INITS, LeNetDLG, init_weights
from lightning_privacy.models.resnet import resnet18_cifar
from lightning_privacy.models.text import TinyTransformerLM, language_model_loss

if TYPE_CHECKING:
    from lightning_privacy.models.lit import LitClassifier

# The Lightning module is imported on first use: the plain-torch models import no Lightning.
__getattr__ = lazy_exports(__name__, {"LitClassifier": ".lit"})

__all__ = [
    "INITS",
    "LeNetDLG",
    "LitClassifier",
    "TinyTransformerLM",
    "init_weights",
    "language_model_loss",
    "resnet18_cifar",
]
