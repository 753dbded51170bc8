"""Where ``InversionAudit``'s truth-vs-reconstruction grids (and the threat-model text) go.

Images of held-out data are sensitive, so a grid goes only to the Trainer's loggers, each in its
own way, and to a directory the user names:

* TensorBoard (any logger whose ``experiment`` has ``add_image``): ``add_image`` into its event
  file, under ``attack/reconstruction``.
* MLflow (``MLFlowLogger``): ``MlflowClient.log_image(run_id, image, key=..., step=...)``, an image
  artifact of the run (``images/attack~reconstruction+step+<step>+...png``).
* Weights & Biases (any logger with ``log_image``): ``log_image``, a media file of the run.
* CSV (any other logger with a ``log_dir``: it has no image API): PNG files
  ``<log_dir>/inversion_audit/step_<step>.png``; the ``log_dir`` is under the ``save_dir`` the
  user gave the logger. Not for the ``CSVLogger`` Lightning makes itself for ``logger=True``
  when TensorBoard is missing: its directory was nobody's choice.
* ``image_dir``: PNG files ``<image_dir>/step_<step>.png``.

The PNG files written here are created ``0600`` (owner read/write only) and the directories
created for them ``0700``; nothing is ever written into the working directory or
``trainer.default_root_dir`` by default. What the loggers write keeps their own permissions.
With nowhere to send a grid, nothing is written and a warning says, once per Trainer, how to get
the images. A logger that fails to take a grid or a text is a ``RuntimeWarning``; training and the
other loggers go on.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> grid = reconstruction_grid(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4))
    >>> folder = Path(tempfile.mkdtemp()) / "grids"
    >>> path = write_private_png(grid, folder / "step_0000001.png")
    >>> oct(path.stat().st_mode & 0o777), oct(folder.stat().st_mode & 0o777)
    ('0o600', '0o700')
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_privacy._validation import describe

IMAGE_KEY = "attack/reconstruction"
FOLDER = "inversion_audit"

#: The callbacks already warned, per Trainer, that their images have nowhere to go.
_warned: weakref.WeakKeyDictionary[L.Trainer, set[str]] = weakref.WeakKeyDictionary()


def check_image_dir(image_dir: Any) -> Path | None:
    """Validate ``InversionAudit(image_dir=...)``: ``None`` or a path that is not a file.

    Example:
        >>> check_image_dir("grids"), check_image_dir(None)
        (PosixPath('grids'), None)
        >>> check_image_dir(3)
        Traceback (most recent call last):
        ...
        TypeError: Expected `image_dir` to be None or a path (str or os.PathLike), but got 3 (int).
    """
    if image_dir is None:
        return None
    if not isinstance(image_dir, (str, os.PathLike)) or not os.fspath(image_dir):
        raise TypeError(
            "Expected `image_dir` to be None or a path (str or os.PathLike), "
            f"but got {describe(image_dir)}."
        )
    path = Path(os.fspath(image_dir)).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"Expected `image_dir` to be a directory (or not to exist yet), but got {str(path)!r}, "
            "which is a file."
        )
    return path


def reconstruction_grid(truth: Tensor, reconstruction: Tensor) -> Tensor:
    """One image: the truth (top row) over the reconstruction (bottom row), in ``[0, 1]``.

    Reconstructions of a batch are matched to the truth (least total squared error) first, as the
    attacker's order is arbitrary.

    Args:
        truth: ``(N, C, H, W)`` held-out images.
        reconstruction: ``(N, C, H, W)`` reconstructions (clamped to ``[0, 1]``).

    Returns:
        A ``(3, H', W')`` float grid (``torchvision.utils.make_grid``, 1-pixel white padding).

    Example:
        >>> grid = reconstruction_grid(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4))
        >>> tuple(grid.shape), grid.min().item(), grid.max().item()
        ((3, 11, 11), 0.0, 1.0)
    """
    from torchvision.utils import make_grid

    from lightning_privacy.functional.metrics import match_order

    rec = reconstruction.detach().cpu().float().clamp(0, 1)
    truth = truth.detach().cpu().float().clamp(0, 1)
    if len(rec) > 1:
        rec = rec[match_order(rec, truth)]
    return make_grid(torch.cat([truth, rec]), nrow=len(truth), padding=1, pad_value=1.0)


def _pixels(grid: Tensor) -> np.ndarray:
    """``(H, W, C)`` (``(H, W)``: one channel) ``uint8`` pixels, rounded like ``save_image``."""
    if not (isinstance(grid, Tensor) and grid.dim() == 3 and grid.shape[0] in (1, 3, 4)):
        shape = tuple(grid.shape) if isinstance(grid, Tensor) else describe(grid)
        raise ValueError(
            f"Expected `grid` to be a (C, H, W) tensor with C in (1, 3, 4), but got {shape}."
        )
    array = grid.detach().cpu().float().mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    pixels = array.permute(1, 2, 0).numpy()
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def _private_dir(folder: Path, *, ours: bool) -> None:
    """Create ``folder`` and its missing parents ``0700``; also tighten it if ``ours``."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
        path.chmod(0o700)  # mkdir's mode is masked by the umask
    if ours and not missing:
        folder.chmod(0o700)


def write_private_png(grid: Tensor, path: str | os.PathLike[str], *, ours: bool = True) -> Path:
    """Write ``grid`` as a PNG file readable by its owner only (``0600``, folders made ``0700``).

    Args:
        grid: A ``(C, H, W)`` float tensor in ``[0, 1]``, ``C`` in 1, 3, 4.
        path: The file; its missing folders are created ``0700``.
        ours: The file's folder is the package's own: tighten it to ``0700`` even if it exists.

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> path = write_private_png(torch.ones(3, 2, 2), Path(tempfile.mkdtemp()) / "a.png")
        >>> oct(path.stat().st_mode & 0o777)
        '0o600'
    """
    from PIL import Image

    pixels = _pixels(grid)
    path = Path(path)
    _private_dir(path.parent, ours=ours)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(path, flags, 0o600), "wb") as file:
        if hasattr(os, "fchmod"):
            os.fchmod(file.fileno(), 0o600)  # an older file, or a umask without owner bits
        Image.fromarray(pixels).save(file, format="PNG")
    return path


def _tensorboard_available() -> bool:
    return find_spec("tensorboard") is not None or find_spec("tensorboardX") is not None


def _lightnings_own_csv_logger(trainer: L.Trainer, logger: Logger) -> bool:
    """Whether ``logger`` may be the ``CSVLogger`` Lightning made for ``logger=True``.

    Lightning makes one (in ``default_root_dir``, the working directory by default) only when
    neither TensorBoard nor tensorboardX is installed; with either, a ``CSVLogger`` is the user's.
    """
    return (
        type(logger) is CSVLogger
        and not _tensorboard_available()
        and logger.name == "lightning_logs"
        and os.path.abspath(logger.save_dir) == os.path.abspath(trainer.default_root_dir)
    )


def _send_image(
    trainer: L.Trainer,
    logger: Logger,
    grid: Tensor,
    step: int,
    key: str = IMAGE_KEY,
    folder: str = FOLDER,
) -> str | None:
    """Send ``grid`` to one logger in its own way; where it went (``None``: it takes no images)."""
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, _pixels(grid), key=key, step=step)
        return f"MLflow run {logger.run_id} {key}"
    experiment = getattr(logger, "experiment", None)
    if callable(getattr(experiment, "add_image", None)):
        pixels = _pixels(grid)
        formats = "HWC" if pixels.ndim == 3 else "HW"
        experiment.add_image(key, pixels, step, dataformats=formats)  # type: ignore[union-attr]
        return f"{type(logger).__name__} {key}"
    if callable(getattr(logger, "log_image", None)):
        logger.log_image(key=key, images=[_pixels(grid)], step=step)  # type: ignore[attr-defined]
        return f"{type(logger).__name__} {key}"
    log_dir = getattr(logger, "log_dir", None)
    if isinstance(log_dir, (str, os.PathLike)) and not _lightnings_own_csv_logger(trainer, logger):
        return str(write_private_png(grid, Path(log_dir) / folder / f"step_{step:07d}.png"))
    return None


def _warn_failed(what: str, target: str, err: Exception, owner: str = "InversionAudit") -> None:
    rank_zero_warn(
        f"{owner} could not send the {what} to {target}: {type(err).__name__}: {err}",
        category=RuntimeWarning,
    )


def _each_logger(
    trainer: L.Trainer,
    what: str,
    send: Callable[[Logger], str | None],
    owner: str = "InversionAudit",
) -> tuple[list[str], int]:
    """Where ``send`` put ``what`` for each logger that took it; how many loggers raised.

    A logger that raises is a ``RuntimeWarning``: training and the other loggers go on.
    """
    sent, failed = [], 0
    for logger in trainer.loggers:
        try:
            where = send(logger)
        except Exception as err:
            _warn_failed(what, type(logger).__name__, err, owner)
            failed += 1
            continue
        if where is not None:
            sent.append(where)
    return sent, failed


def send_image(
    trainer: L.Trainer,
    grid: Tensor,
    step: int,
    *,
    image_dir: str | os.PathLike[str] | None = None,
    key: str = IMAGE_KEY,
    folder: str = FOLDER,
    owner: str = "InversionAudit",
    what: str = "reconstruction grid",
) -> list[str]:
    """Send a grid to every logger of ``trainer`` in that logger's own way, and to ``image_dir``.

    See the module docstring for what goes where. With nowhere to send it, nothing is written and
    a warning (once per Trainer) says how to get the images.

    Args:
        trainer: Its ``loggers`` receive the grid (call on global rank 0 only).
        grid: A ``(C, H, W)`` float tensor in ``[0, 1]`` (:func:`reconstruction_grid`).
        step: The global step the grid belongs to.
        image_dir: A directory the user named: ``step_<step>.png`` files there too (``0600``).
        key: The image's tag in the loggers.
        folder: The folder under a CSV logger's ``log_dir``.
        owner: The callback sending it, for the warnings (``MembershipAudit`` sends ROC curves).
        what: What the image is, for the warnings.

    Returns:
        Where the grid went (for messages and tests).

    Example:
        >>> import tempfile
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> root = Path(tempfile.mkdtemp())
        >>> trainer = L.Trainer(logger=CSVLogger(root), enable_progress_bar=False)
        >>> (where,) = send_image(trainer, torch.ones(3, 2, 2), step=5)
        >>> Path(where).relative_to(root).as_posix()
        'lightning_logs/version_0/inversion_audit/step_0000005.png'
    """
    _pixels(grid)  # a bad grid is the caller's error, not a logger's
    sent, failed = _each_logger(
        trainer, what, lambda lg: _send_image(trainer, lg, grid, step, key, folder), owner
    )
    if image_dir is not None:
        try:
            path = write_private_png(grid, Path(image_dir) / f"step_{step:07d}.png", ours=False)
        except OSError as err:
            _warn_failed(what, f"image_dir={os.fspath(image_dir)!r}", err, owner)
            failed += 1
        else:
            sent.append(str(path))
    warned = _warned.setdefault(trainer, set())
    if not sent and not failed and owner not in warned:
        warned.add(owner)
        _warn_nowhere(owner)
    return sent


def _warn_nowhere(owner: str) -> None:
    if owner == "InversionAudit":
        rank_zero_warn(
            "InversionAudit has nowhere to put its truth-vs-reconstruction images: no logger of "
            "the Trainer takes images (TensorBoardLogger, WandbLogger, MLFlowLogger, or a "
            "CSVLogger with a save_dir you chose) and no `image_dir` was given, so none are "
            "saved. Pass `InversionAudit(image_dir=...)` (files written 0600) or such a logger, "
            "or `log_images=False` to silence this."
        )
        return
    rank_zero_warn(
        f"{owner} has nowhere to put its images: no logger of the Trainer takes images "
        "(TensorBoardLogger, WandbLogger, MLFlowLogger, or a CSVLogger with a save_dir you "
        f"chose) and no `image_dir` was given, so none are saved. Pass `{owner}(image_dir=...)` "
        "(files written 0600) or such a logger, or `log_roc=False` to silence this."
    )


def _send_text(logger: Logger, key: str, text: str, step: int) -> str | None:
    if isinstance(logger, MLFlowLogger):
        name = f"{FOLDER}/{key.replace('/', '_')}_step_{step:07d}.txt"
        logger.experiment.log_text(logger.run_id, text, artifact_file=name)
        return f"MLflow run {logger.run_id} {name}"
    experiment = getattr(logger, "experiment", None)
    if callable(getattr(experiment, "add_text", None)):
        experiment.add_text(key, text, step)  # type: ignore[union-attr]
        return f"{type(logger).__name__} {key}"
    if callable(getattr(logger, "log_text", None)):
        logger.log_text(key=key, columns=["text"], data=[[text]], step=step)  # type: ignore[attr-defined]
        return f"{type(logger).__name__} {key}"
    return None


def send_text(trainer: L.Trainer, key: str, text: str, step: int) -> list[str]:
    """Send a text to every logger of ``trainer`` that has a text API.

    TensorBoard ``add_text``; W&B ``log_text`` (a one-cell table); MLflow ``log_text`` (an
    artifact ``inversion_audit/<key>_step_<step>.txt``). Loggers without one are skipped.

    Args:
        trainer: Its ``loggers`` receive the text (call on global rank 0 only).
        key: The tag, e.g. ``"attack/threat_model"``.
        text: The text.
        step: The global step it belongs to.

    Returns:
        Where the text went.

    Example:
        >>> send_text(L.Trainer(logger=False), "attack/threat_model", "{}", 0)
        []
    """
    return _each_logger(trainer, f"text {key!r}", lambda lg: _send_text(lg, key, text, step))[0]
