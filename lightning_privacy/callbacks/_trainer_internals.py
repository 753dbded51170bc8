"""Every access to private Lightning ``Trainer`` internals, in one place.

The callbacks use public hooks wherever one exists. The few things below have no public API;
each function says why, so that a Lightning upgrade that moves one of them breaks here and only
here (the tests of the callbacks that use them fail on the function's name).

Example:
    >>> import lightning as L
    >>> trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    >>> uses_distributed_sampler(trainer), process_group_timeout(trainer)
    (True, datetime.timedelta(seconds=1800))
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader

__all__ = [
    "accumulating",
    "process_group_timeout",
    "replace_train_dataloader",
    "restore_train_source",
    "train_dataloader_before_fit",
    "train_source",
    "uses_distributed_sampler",
    "validation_source",
    "wrap_backward",
]

BackwardWrapper = Callable[[Tensor, Callable[[Tensor], Any]], Any]


def train_source(trainer: L.Trainer) -> Any:
    """The fit loop's train ``_DataLoaderSource`` (``None`` before ``fit``).

    Why private: DP-SGD must *replace* the train loader by Opacus's Poisson loader after the
    optimizer exists (``on_fit_start``); ``trainer.train_dataloader`` is read-only and built later,
    and the public hooks give no way to swap the loader the fit loop iterates.
    """
    return getattr(trainer.fit_loop, "_data_source", None)


def replace_train_dataloader(trainer: L.Trainer, loader: DataLoader[Any]) -> None:
    """Make the fit loop iterate ``loader`` (rebuilt from it at the first epoch).

    Why private: see :func:`train_source`; Lightning rebuilds its combined loader from the data
    source when ``_combined_loader`` is ``None``.
    """
    from lightning.pytorch.trainer.connectors.data_connector import _DataLoaderSource

    trainer.fit_loop._data_source = _DataLoaderSource(loader, "train_dataloader")
    trainer.fit_loop._combined_loader = None


def train_dataloader_before_fit(trainer: L.Trainer) -> Any:
    """The train ``DataLoader`` the fit will iterate, built from its source (``None``: none).

    Why private: ``MembershipAudit`` draws its member sample from the training data in ``setup``
    (so bad input fails before training and a resumed run can restore the sample), but
    ``trainer.train_dataloader`` is only built when the fit loop starts; the fit loop's data
    source (datamodule, module or ``fit`` argument) is what gives the loader earlier. Building it
    reads no data and draws nothing from the global RNG.
    """
    source = train_source(trainer)
    if source is None or not source.is_defined():
        return None
    loader = source.dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    return loader


def restore_train_source(trainer: L.Trainer, source: Any) -> None:
    """Put back the data source :func:`train_source` returned (so the Trainer can fit again)."""
    trainer.fit_loop._data_source = source


def uses_distributed_sampler(trainer: L.Trainer) -> bool:
    """``Trainer(use_distributed_sampler=...)``.

    Why private: the Trainer keeps the flag only on its accelerator connector, and DP-SGD under
    DDP must refuse a ``DistributedSampler`` (it would break the Poisson accounting) before fit.
    """
    return bool(trainer._accelerator_connector.use_distributed_sampler)


def wrap_backward(trainer: L.Trainer, wrapper: BackwardWrapper) -> Callable[[], None]:
    """Route the precision plugin's ``backward`` through ``wrapper(loss, original_backward)``.

    Returns a function that removes the wrapper. Why private: ``LightningModule.backward`` is the
    public override point, but it belongs to the user's module; a callback that must change how a
    per-sample loss is back-propagated (Opacus's ghost clipping, the mean of per-sample losses)
    can only do it on the precision plugin, as an instance attribute that is deleted afterwards.
    """
    plugin = trainer.precision_plugin
    original = plugin.backward

    def backward(tensor: Tensor, model: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        return wrapper(tensor, lambda loss: original(loss, model, optimizer, *args, **kwargs))

    plugin.backward = backward  # type: ignore[method-assign]

    def unwrap() -> None:
        if "backward" in vars(plugin):
            del plugin.backward

    return unwrap


def validation_source(trainer: L.Trainer) -> Any:
    """The validation ``_DataLoaderSource``, whatever provides it (datamodule, module, ``fit``).

    Why private: observers take their held-out batch in ``setup``, before Lightning shards the
    validation loader with a distributed sampler (so every rank holds the same batch);
    ``trainer.val_dataloaders`` exists only once validation has run.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    source = getattr(getattr(loop, "val_loop", None), "_data_source", None)
    if source is None:  # older layouts kept it on the data connector
        connector = getattr(trainer, "_data_connector", None)
        source = getattr(connector, "_val_dataloader_source", None)
    return source


def accumulating(trainer: L.Trainer) -> bool:
    """Whether the batch that just ended was not the last one of its optimizer step.

    Why private: ``on_train_batch_end`` does not say whether the optimizer stepped; the epoch
    loop's ``_should_accumulate`` does, and noise drawn ahead for a step must survive the step's
    accumulating batches.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    return bool(getattr(epoch_loop, "_should_accumulate", lambda: False)())


def process_group_timeout(trainer: L.Trainer) -> timedelta:
    """The timeout of the strategy's process group (Lightning's default: 30 minutes).

    Why private: strategies keep it as ``_timeout``; an attack on rank 0 must end well before the
    other ranks, waiting in a collective, time out.
    """
    timeout = getattr(trainer.strategy, "_timeout", None)
    return timeout if isinstance(timeout, timedelta) else timedelta(minutes=30)
