"""Gradient-inversion attacks as registered, configured components.

Example:
    >>> from lightning_privacy.attacks import create_attack, list_attacks
    >>> type(create_attack("idlg")).__name__
    'IDLG'
"""

from lightning_privacy.attacks.analytic import AnalyticLinear, AnalyticPatchEmbedding, TokenLeakage
from lightning_privacy.attacks.base import ATTACKS, Attack, create_attack, list_attacks
from lightning_privacy.attacks.dlg import IDLG, DeepLeakage
from lightning_privacy.attacks.inverting import InvertingGradients
from lightning_privacy.functional.attacks.common import Reconstruction

__all__ = [
    "ATTACKS",
    "IDLG",
    "AnalyticLinear",
    "AnalyticPatchEmbedding",
    "Attack",
    "DeepLeakage",
    "InvertingGradients",
    "Reconstruction",
    "TokenLeakage",
    "create_attack",
    "list_attacks",
]
