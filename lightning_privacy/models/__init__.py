"""Reference models: the DLG LeNet, a CIFAR-style ResNet-18 and the LitClassifier module.

Example:
    >>> from lightning_privacy.models import LeNetDLG, LitClassifier
    >>> LitClassifier(LeNetDLG()).lr
    0.05
"""

from lightning_privacy.models.lenet import INITS, LeNetDLG, init_weights
from lightning_privacy.models.lit import LitClassifier
from lightning_privacy.models.resnet import resnet18_cifar
from lightning_privacy.models.text import TinyTransformerLM, language_model_loss

__all__ = [
    "INITS",
    "LeNetDLG",
    "LitClassifier",
    "TinyTransformerLM",
    "init_weights",
    "language_model_loss",
    "resnet18_cifar",
]
