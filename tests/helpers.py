"""What the tests share: a user's LightningModule, tiny offline data, and fit helpers.

Importable as ``helpers`` from every test file (``pythonpath = ["tests"]`` in the pytest options)
and from the DDP scripts (``ddp_launch.run_ddp_script`` puts ``tests/`` on ``PYTHONPATH``).

* :class:`BoringModel` -- a small conv (or MLP) classifier with ``BatchNorm`` and ``Dropout``,
  written the way a user writes a module (not our ``LitClassifier``); its options rebuild the
  exact networks that tests with numeric expectations were written against.
* Data: :func:`digits` (the embedded 8x8 digits), :func:`random_tensors` (seeded), :func:`loader`,
  :func:`digits_loader`, :func:`digits_datamodule`.
* Fitting: :func:`fit` (a ``Trainer`` from ``fast_trainer_kwargs``, fitted, returned with the
  module); under DDP :func:`ddp_trainer_kwargs`, :func:`fit_ddp`, and for the reports
  :func:`flat_parameters` and :func:`all_ranks_equal`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_privacy.data import DigitsDataModule, load_digits_tensors

QUIET_TRAINER = dict(
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


class BoringModel(L.LightningModule):
    """A user's classifier: ``conv -> [BatchNorm] -> act -> [Dropout] -> linear`` (or an MLP).

    Args:
        input_shape: Shape of one input: ``(C, H, W)`` for the conv net; for the MLP any shape
            (inputs of more than one dimension are flattened first).
        num_classes: Number of logits.
        width: Conv channels, or hidden units of the MLP.
        conv: A 3x3 same-padding conv layer first (else a linear layer).
        batch_norm: A ``BatchNorm`` after the first layer.
        dropout: Dropout probability after the activation (``0``: no dropout layer).
        activation: The activation's class.
        lr: SGD learning rate.
        manual: Manual optimization (``training_step`` steps the optimizer itself).
        seed: Seeds torch's global generator before building the layers (``None``: does not), so
            two modules built with the same arguments start from the same weights.

    Layers that are switched off are left out (no ``Identity``), so ``net.<i>`` names are those
    of the network written out by hand.
    """

    def __init__(
        self,
        *,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        width: int = 4,
        conv: bool = True,
        batch_norm: bool = True,
        dropout: float = 0.3,
        activation: Callable[[], nn.Module] = nn.ReLU,
        lr: float = 0.1,
        manual: bool = False,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        if conv:
            channels, *spatial = input_shape
            layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1)]
            norm: type[nn.Module] = nn.BatchNorm2d
            head = nn.Linear(width * math.prod(spatial), num_classes)
        else:
            layers = [nn.Flatten()] if len(input_shape) > 1 else []
            layers.append(nn.Linear(math.prod(input_shape), width))
            norm = nn.BatchNorm1d
            head = nn.Linear(width, num_classes)
        if batch_norm:
            layers.append(norm(width))
        layers.append(activation())
        if dropout:
            layers.append(nn.Dropout(dropout))
        if conv:
            layers.append(nn.Flatten())
        self.net = nn.Sequential(*layers, head)
        self.loss_fn = F.cross_entropy
        self.lr = lr
        self.automatic_optimization = not manual

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss_fn(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


# BoringModel options for a plain tanh MLP on flat features with SGD lr=1 (the update is minus the
# defended gradient); add input_shape, width and num_classes
PLAIN_MLP = dict(conv=False, batch_norm=False, dropout=0.0, activation=nn.Tanh, lr=1.0)
# BoringModel options for a sigmoid MLP (with BatchNorm and dropout) on 4x4 inputs and 3 classes:
# smooth, and small enough for a dense I2F estimate (LeakageMonitor); see random_tensors
SIGMOID_MLP = dict(
    input_shape=(1, 4, 4), width=12, num_classes=3, conv=False, activation=nn.Sigmoid
)


class Recorder(L.Callback):
    """Records the gradients seen in ``on_before_optimizer_step`` and the parameters around it.

    Put one before and one after a ``GradientDefense`` in the callbacks to see the gradient
    before and after the defense, and the update the optimizer made from it.
    """

    def __init__(self) -> None:
        self.grads: list[dict[str, Tensor]] = []
        self.before: list[dict[str, Tensor]] = []
        self.after: list[dict[str, Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})
        self.before.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if len(self.after) < len(self.before):
            self.after.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def digits(n: int | None = None, *, image_size: int = 8) -> tuple[Tensor, Tensor]:
    """The first ``n`` (default: all 1,797) embedded digits, ``(n, 1, image_size, image_size)``."""
    x, y = load_digits_tensors(image_size=image_size, channels=1)
    return x[:n], y[:n]


def random_tensors(
    n: int,
    shape: Sequence[int],
    *,
    num_classes: int,
    seed: int = 0,
    normal: bool = False,
    label_seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``n`` seeded inputs (uniform in [0, 1), or standard normal) and labels below ``num_classes``.

    The labels are drawn after the inputs from the same generator, or from their own generator
    seeded with ``label_seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    draw = torch.randn if normal else torch.rand
    x = draw(n, *shape, generator=generator)
    labels = generator if label_seed is None else torch.Generator().manual_seed(label_seed)
    return x, torch.randint(0, num_classes, (n,), generator=labels)


def loader(x: Tensor, y: Tensor, *, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    """A ``DataLoader`` over ``(x, y)``."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def digits_loader(n: int = 48, *, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    """A loader over the first ``n`` 8x8 digits (the default :class:`BoringModel`'s input)."""
    return loader(*digits(n), batch_size=batch_size, shuffle=shuffle)


def digits_datamodule(batch_size: int = 64, *, image_size: int = 8) -> DigitsDataModule:
    """All the digits, split 1,438 train / 359 validation."""
    return DigitsDataModule(image_size=image_size, batch_size=batch_size)


def fit(
    trainer_kwargs: dict[str, Any],
    callbacks: Iterable[L.Callback] = (),
    module: L.LightningModule | None = None,
    train: Any = None,
    val: Any = None,
    *,
    ckpt_path: Any = None,
    **overrides: Any,
) -> tuple[L.Trainer, L.LightningModule]:
    """Fit ``module`` (default: a fresh :class:`BoringModel`) on ``train`` and return both.

    Args:
        trainer_kwargs: Usually the ``fast_trainer_kwargs`` fixture.
        callbacks: The trainer's callbacks.
        module: The module to fit.
        train: Train loader or data module (default: :func:`digits_loader`).
        val: Validation loader, or ``None``.
        ckpt_path: Checkpoint to resume from.
        **overrides: Trainer arguments that replace or extend ``trainer_kwargs``.
    """
    module = BoringModel() if module is None else module
    train = digits_loader() if train is None else train
    trainer = L.Trainer(callbacks=list(callbacks), **{**trainer_kwargs, **overrides})
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer, module


def ddp_trainer_kwargs(**strategy_kwargs: Any) -> dict[str, Any]:
    """Trainer arguments for 2-process DDP on CPU (gloo), writing nothing."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = DDPStrategy(process_group_backend="gloo", **strategy_kwargs)
    return dict(accelerator="cpu", devices=2, strategy=strategy, **QUIET_TRAINER)


def fit_ddp(
    callbacks: Iterable[L.Callback], module: L.LightningModule, train: Any, **overrides: Any
) -> tuple[L.Trainer, bool]:
    """:func:`fit` under 2-process DDP; also whether every rank ended with the same parameters."""
    trainer, module = fit(ddp_trainer_kwargs(), callbacks, module, train, **overrides)
    return trainer, all_ranks_equal(flat_parameters(module))


def end_ddp() -> None:
    """Destroy the process group before the interpreter exits (the end of every DDP script).

    Left to interpreter exit, gloo's threads were destroyed while still joinable: the
    LeakageMonitor script aborted ("terminate called without an active exception", exit code
    -6) in 3 of 16 runs, and in none of 10 with this call.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def flat_parameters(module: nn.Module) -> Tensor:
    """All parameters of ``module`` as one detached 1-D copy."""
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def all_ranks_equal(tensor: Tensor) -> bool:
    """Whether every rank of the process group holds a bitwise equal ``tensor``."""
    import torch.distributed as dist

    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


#: The repository root (examples are run from here, as the README says).
REPO = Path(__file__).resolve().parents[1]


def run_example(
    *args: str, cwd: Path = REPO, columns: int = 120, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """``python *args`` as a user runs an example: one thread, a fixed terminal width; it must
    exit 0 (the assertion shows the end of its stderr)."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": str(columns)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result
