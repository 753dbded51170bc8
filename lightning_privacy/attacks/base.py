"""The interface of attack components and their registry.

An attack is a frozen dataclass holding its hyperparameters (defaults: the paper's preset) with
one method, ``reconstruct(model, gradients, *, input_shape, num_samples, labels=None,
loss_fn=..., generator=None) -> Reconstruction``; the work is done by a pure function in
:mod:`lightning_privacy.functional.attacks`.

Example:
    >>> from lightning_privacy.attacks import create_attack, list_attacks
    >>> "deep_leakage" in list_attacks()
    True
    >>> create_attack("deep_leakage", max_iterations=10).max_iterations
    10
"""

from __future__ import annotations

import dataclasses
from abc import ABC
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Generator, Tensor, nn

from lightning_privacy._registry import Registry
from lightning_privacy.functional.attacks.common import Gradients, LossFn, Reconstruction
from lightning_privacy.functional.gradients import differentiable_attention

ATTACKS: Registry[Attack] = Registry("attack")


class Attack(ABC):
    """Base class of attack components.

    Subclasses are frozen dataclasses whose fields are the hyperparameters of their functional
    core ``function``; :meth:`reconstruct` passes them by name, with the common arguments the
    core takes (``common_arguments``).

    Attributes:
        modality: ``"image"`` (continuous inputs) or ``"text"`` (token ids); an audit checks it
            against the model's inputs before training.
        function: The pure function in :mod:`lightning_privacy.functional.attacks` doing the work.
        common_arguments: Which of ``labels``, ``loss_fn``, ``generator`` the function takes.

    Example:
        >>> from lightning_privacy.attacks import DeepLeakage, TokenLeakage
        >>> isinstance(DeepLeakage(), Attack), DeepLeakage.modality, TokenLeakage.modality
        (True, 'image', 'text')
    """

    modality: ClassVar[str] = "image"
    function: ClassVar[Callable[..., Reconstruction]]
    common_arguments: ClassVar[tuple[str, ...]] = ("labels", "loss_fn", "generator")

    def options(self) -> dict[str, Any]:
        """The hyperparameters passed to :attr:`function` (the dataclass fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def reconstruct(
        self,
        model: nn.Module,
        gradients: Gradients,
        *,
        input_shape: Sequence[int],
        num_samples: int,
        labels: Tensor | None = None,
        loss_fn: LossFn = F.cross_entropy,
        generator: Generator | None = None,
    ) -> Reconstruction:
        """Rebuild ``num_samples`` inputs of shape ``input_shape`` from ``gradients``.

        Attention runs on its double-differentiable math kernel meanwhile
        (:func:`~lightning_privacy.functional.gradients.differentiable_attention`), so a timm or
        Hugging Face transformer is attacked as it is.
        """
        common = {"labels": labels, "loss_fn": loss_fn, "generator": generator}
        with differentiable_attention():
            return type(self).function(
                model,
                gradients,
                input_shape=input_shape,
                num_samples=num_samples,
                **{name: common[name] for name in self.common_arguments},
                **self.options(),
            )


def create_attack(name: str, **kwargs: Any) -> Attack:
    """Build the attack registered under ``name`` with hyperparameters ``kwargs``.

    Example:
        >>> try:
        ...     create_attack("deep_lekage")
        ... except ValueError as err:
        ...     print(str(err).split(" Available")[0])
        Unknown attack 'deep_lekage'. Did you mean 'deep_leakage'?
    """
    return ATTACKS.create(name, **kwargs)


def list_attacks() -> list[str]:
    """Names of the registered attacks.

    Example:
        >>> {"deep_leakage", "idlg"} <= set(list_attacks())
        True
    """
    return ATTACKS.names()
