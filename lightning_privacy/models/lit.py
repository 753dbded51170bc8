"""A LightningModule for image classification that every example and test builds on.

Example:
    >>> import lightning as L
    >>> from lightning_privacy.data import DigitsDataModule
    >>> from lightning_privacy.models import LeNetDLG
    >>> module = LitClassifier(LeNetDLG(num_classes=10, channels=1, image_size=16), lr=0.1)
    >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1,
    ...                     logger=False, enable_progress_bar=False,
    ...                     enable_checkpointing=False, enable_model_summary=False)
    >>> trainer.fit(module, DigitsDataModule(image_size=16, batch_size=16))
    >>> "val/acc" in trainer.callback_metrics
    True
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_privacy._validation import check_choice, check_float


class LitClassifier(L.LightningModule):
    """Cross-entropy classifier that logs ``train/loss``, ``val/loss`` and ``val/acc``.

    Args:
        model: Any ``nn.Module`` mapping images to logits.
        lr: Learning rate.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: L2 penalty.

    Attributes:
        loss_fn: The mean-reduced loss ``loss_fn(logits, targets)``, read by the attack and
            leakage callbacks so the attacker differentiates the same objective.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr = check_float("lr", lr, low=0.0, low_open=True)
        self.optimizer_name = check_choice("optimizer", optimizer, ("sgd", "adam"))
        self.momentum = check_float("momentum", momentum, low=0.0, high=1.0)
        self.weight_decay = check_float("weight_decay", weight_decay, low=0.0)
        self.loss_fn = F.cross_entropy
        self.save_hyperparameters(ignore=["model"])

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Logits."""
        return self.model(x)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Mean cross-entropy of the batch."""
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Held-out loss and accuracy."""
        x, y = batch
        logits = self(x)
        self.log("val/loss", self.loss_fn(logits, y), sync_dist=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True, sync_dist=True)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD or Adam over all parameters."""
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
