"""One trial of a sweep: train, defend, audit, and store its ``result.json`` atomically.

The same :func:`run_trial` runs in a local process, in the demo's own process and inside a Ray
Tune worker, so every backend produces the same files. A trial is finished exactly when its
``result.json`` exists with the trial's fingerprint; a rerun skips it.

Example:
    >>> from lightning_privacy.sweep.config import TrialSpec
    >>> build_transforms(TrialSpec("gaussian_noise", 0.1))
    [GaussianNoise(std=0.1)]
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from typing_extensions import override

from lightning_privacy.defenses import GradientTransform
from lightning_privacy.sweep.components import (
    NO_DEFENSE,
    SPECIAL_DEFENSES,
    audit_callback,
    build_transform,
    defense_callback,
    leakage_callback,
    membership_callback,
)
from lightning_privacy.sweep.config import TrialSpec
from lightning_privacy.sweep.results import (
    RESULT_COLUMNS,
    RESULT_FILE,
    TrialResult,
    load_finished,
    trial_dir,
    write_json_atomic,
    write_result,
)

__all__ = [
    "EVENTS_FILE",
    "RESULT_COLUMNS",
    "RESULT_FILE",
    "build_callbacks",
    "build_transforms",
    "dry_run_trial",
    "load_finished",
    "log_event",
    "quiet_lightning",
    "run_trial",
    "safe_run_trial",
    "write_json_atomic",
]

EVENTS_FILE = "events.log"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: The measurement fields of a result and the logged scalar each one is the last value of.
_MEASURED = {
    "val_acc": "val/acc",
    "epsilon": "privacy/epsilon",
    "attack_psnr": "attack/psnr",
    "attack_ssim": "attack/ssim",
    "predicted_psnr": "leakage/predicted_psnr",
    "mia_auc": "membership/auc",
    "mia_tpr_at_1pct_fpr": "membership/tpr_at_fpr_0.01",
    "audited_epsilon": "membership/epsilon_lower_bound",
}


def build_transforms(spec: TrialSpec) -> list[GradientTransform]:
    """The gradient transforms of a trial (empty for ``none`` and ``dpsgd``).

    Example:
        >>> from lightning_privacy.sweep.config import TrialSpec
        >>> build_transforms(TrialSpec("low_rank", 2)), build_transforms(TrialSpec("dpsgd", 1.0))
        ([LowRankFiltering(rank=2)], [])
    """
    if spec.defense in SPECIAL_DEFENSES or spec.strength is None:
        return []
    return [build_transform(spec.defense, spec.strength, spec.options)]


def build_callbacks(spec: TrialSpec) -> list[Callback]:
    """The callbacks of a trial: its defense, then the observers that are enabled.

    Every callback is built from its section with the sweep's training seed
    (:mod:`lightning_privacy.sweep.components`).

    Example:
        >>> from lightning_privacy.sweep.config import parse_sweep_config
        >>> spec = parse_sweep_config("defenses: [{name: dpsgd, strengths: [1.0]}]").trials()[0]
        >>> [type(c).__name__ for c in build_callbacks(spec)]
        ['DPSGD', 'InversionAudit', 'LeakageMonitor', 'MembershipAudit']
    """
    settings = spec.settings
    seed = int(settings["training"]["seed"])
    audit, leakage = settings.get("audit"), settings.get("leakage")
    membership = settings.get("membership")
    callbacks = [
        defense_callback(spec.defense, spec.strength, spec.options, seed=seed),
        None if audit is None else audit_callback(audit, seed=seed),
        None if leakage is None else leakage_callback(leakage, seed=seed),
        None if membership is None else membership_callback(membership, seed=seed),
    ]
    return [callback for callback in callbacks if callback is not None]


def _build_model_and_data(settings: Mapping[str, Any]) -> tuple[Any, Any]:
    from lightning_privacy.data import DigitsDataModule, LFWDataModule
    from lightning_privacy.models import LeNetDLG, LitClassifier, resnet18_cifar

    data, model_cfg, training = settings["data"], settings["model"], settings["training"]
    module_cls = {"digits": DigitsDataModule, "lfw": LFWDataModule}[data["dataset"]]
    channels = 1 if model_cfg["name"] == "lenet" else 3
    datamodule = module_cls(
        batch_size=int(data["batch_size"]),
        image_size=int(data["image_size"]),
        channels=channels,
        val_fraction=float(data["val_fraction"]),
        seed=int(training["seed"]),
    )
    num_classes = module_cls.num_classes
    network: torch.nn.Module
    if model_cfg["name"] == "lenet":
        network = LeNetDLG(
            num_classes,
            channels=channels,
            image_size=int(data["image_size"]),
            init=model_cfg["init"],
        )
    else:
        network = resnet18_cifar(num_classes, channels=channels, norm="group")
    module = LitClassifier(network, lr=float(model_cfg["lr"]), optimizer=model_cfg["optimizer"])
    return module, datamodule


def _memory_logger_class() -> Any:
    from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
    from lightning.pytorch.utilities import rank_zero_only

    class MemoryLogger(Logger):
        """Keeps every logged scalar as ``{key: [[step, value], ...]}``; files go to ``root``."""

        def __init__(self, root: Path) -> None:
            super().__init__()
            self.root = root
            self.history: dict[str, list[list[float]]] = defaultdict(list)

        @property
        @override
        def name(self) -> str:
            return "memory"

        @property
        @override
        def version(self) -> str:
            return "0"

        @property
        @override
        def save_dir(self) -> str:
            return str(self.root)

        @property
        @override
        def log_dir(self) -> str:
            return str(self.root)

        @property
        @rank_zero_experiment
        def experiment(self) -> None:
            return None

        @override
        @rank_zero_only
        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            return None

        @override
        @rank_zero_only
        def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
            for key, value in metrics.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                self.history[key].append([float(step or 0), number])

    return MemoryLogger


def _last(history: Mapping[str, list[list[float]]], key: str) -> float | None:
    values = history.get(key) or []
    return values[-1][1] if values else None


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) or number == math.inf else None


def quiet_lightning() -> None:
    """Silence Lightning's per-Trainer banners (GPU available, tips); warnings still show.

    Example:
        >>> import logging
        >>> quiet_lightning()
        >>> logging.getLogger("lightning.pytorch").level == logging.WARNING
        True
    """
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_privacy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")


def log_event(out_dir: str | Path, message: str) -> None:
    """Append one line to the sweep's ``events.log`` (trial starts, finishes, skips).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     log_event(d, "start none-1")
        ...     (Path(d) / EVENTS_FILE).read_text().split()[1:]
        ['start', 'none-1']
    """
    with open(Path(out_dir) / EVENTS_FILE, "a") as handle:
        handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")


def _trainer(
    settings: Mapping[str, Any], callbacks: list[Callback], logger: Any, root: Path
) -> Any:
    """The Lightning Trainer of a trial: CPU, one device, nothing written but under ``root``."""
    import lightning as L

    training = settings["training"]
    limit = training.get("limit_train_batches")
    return L.Trainer(
        max_epochs=int(training["epochs"]),
        limit_train_batches=limit if limit is not None else 1.0,
        callbacks=callbacks,
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=str(root),
    )


def _fit(trainer: Any, module: Any, datamodule: Any) -> tuple[float, tuple[str, ...]]:
    """Train; return the seconds it took and the first line of every distinct warning.

    Lightning answers Ctrl-C with ``sys.exit(1)`` and ignores ``SIGINT`` from then on; here it
    is a ``KeyboardInterrupt`` again (and Ctrl-C works again), so the sweep stops cleanly.
    """
    start = time.perf_counter()
    handler = signal.getsignal(signal.SIGINT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        try:
            trainer.fit(module, datamodule)
        except SystemExit:
            if not trainer.interrupted:
                raise
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, handler)
            raise KeyboardInterrupt from None
    seconds = time.perf_counter() - start
    return seconds, tuple(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))


def _measurements(
    trainer: Any, history: Mapping[str, list[list[float]]], defense: str
) -> dict[str, float | None]:
    """The result's measurement fields: each one's final metric, else its last logged value.

    A measurement whose last run failed is NaN there (the observers' failure policy) and becomes
    ``None``: an earlier good value never stands in for it.
    """
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    measured = {name: metrics.get(key, _last(history, key)) for name, key in _MEASURED.items()}
    if measured["epsilon"] is None and defense == NO_DEFENSE:
        measured["epsilon"] = math.inf
    return {name: _finite_or_none(value) for name, value in measured.items()}


def _image_files(directory: Path) -> tuple[str, ...]:
    """The images a trial's callbacks wrote, relative to its directory."""
    return tuple(
        sorted(
            str(p.relative_to(directory))
            for p in directory.rglob("*")
            if p.suffix.lower() in _IMAGE_SUFFIXES
        )
    )


def run_trial(
    spec_dict: Mapping[str, Any],
    out_dir: str,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train one configuration with its defense and observers; return and store its result.

    Args:
        spec_dict: A :class:`TrialSpec` as a dict (picklable for any backend).
        out_dir: The sweep's output directory; the trial writes ``trials/<trial_id>/``.
        progress: Called with ``(finished_epochs, max_epochs)`` after every training epoch.

    The trial trains with ``spec.settings`` (the shared settings with its defense entry's
    ``overrides`` applied, e.g. DP-SGD's own learning rate and batch size).

    Returns:
        The :class:`~lightning_privacy.sweep.results.TrialResult` as its ``result.json`` dict:
        ``val_acc``, ``epsilon``, ``attack_psnr``, ``attack_ssim``, ``predicted_psnr``, the
        membership audit's ``mia_auc``, ``mia_tpr_at_1pct_fpr`` and ``audited_epsilon``,
        ``seconds``, the logged ``history``, the ``threat_model`` and the ``overrides`` the trial
        ran with (``"model.lr=0.03, data.batch_size=128"``, or ``""``).

    Example:
        >>> import tempfile
        >>> from lightning_privacy.sweep.config import parse_sweep_config
        >>> spec = parse_sweep_config('''
        ... defenses: [{name: none}]
        ... data: {image_size: 16, batch_size: 16}
        ... training: {epochs: 1, limit_train_batches: 1}
        ... audit: null
        ... leakage: null
        ... ''').trials()[0]
        >>> with tempfile.TemporaryDirectory() as d:
        ...     result = run_trial(spec.to_dict(), d)
        ...     load_finished(Path(d), spec) is not None
        True
        >>> result["status"], result["epsilon"], 0.0 <= result["val_acc"] <= 1.0
        ('ok', inf, True)
    """
    import lightning as L

    torch.set_num_threads(1)
    quiet_lightning()
    spec = TrialSpec.from_dict(spec_dict)
    root = Path(out_dir)
    directory = trial_dir(root, spec.trial_id)
    directory.mkdir(parents=True, exist_ok=True)
    log_event(root, f"start {spec.trial_id}")
    L.seed_everything(int(spec.settings["training"]["seed"]), verbose=False)
    module, datamodule = _build_model_and_data(spec.settings)
    callbacks = build_callbacks(spec)
    logger = _memory_logger_class()(directory)
    extra = [] if progress is None else [_epoch_progress(progress)]
    trainer = _trainer(spec.settings, callbacks + extra, logger, directory)
    seconds, messages = _fit(trainer, module, datamodule)
    history = dict(logger.history)
    result = TrialResult.finished(
        spec,
        **_measurements(trainer, history, spec.defense),
        seconds=seconds,
        warnings=messages,
        threat_model=_threat_model(callbacks),
        history=history,
        images=_image_files(directory),
    )
    write_result(root, result)
    log_event(root, f"finish {spec.trial_id}")
    return result.to_dict()


def dry_run_trial(spec: TrialSpec) -> None:
    r"""Build a trial and run its Trainer's checks before the first step, training nothing.

    The model, data module and callbacks are built from ``spec`` and fitted with
    ``limit_train_batches=0`` in a temporary directory: the callbacks' ``setup`` and
    ``on_fit_start`` checks run (held-out batch, adapter probe, DP-SGD's layer check and
    rehearsal, the I²F estimator's defense and time checks), no optimizer step is taken and
    nothing is written under the sweep's directory. The global random state is restored.

    Raises:
        Exception: The first problem found, as the component raised it.

    Example:
        >>> from lightning_privacy.sweep.config import parse_sweep_config
        >>> text = "defenses: [{name: none}]\nmodel: {init: unifrom}"
        >>> spec = parse_sweep_config(text).trials()[0]
        >>> try:
        ...     dry_run_trial(spec)
        ... except ValueError as err:
        ...     print(str(err)[:28])
        Expected `init` to be one of
    """
    import tempfile

    import lightning as L

    state = torch.random.get_rng_state()
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module, datamodule = _build_model_and_data(spec.settings)
            callbacks = build_callbacks(spec)
            with tempfile.TemporaryDirectory() as root:
                trainer = L.Trainer(
                    max_epochs=1,
                    limit_train_batches=0,
                    limit_val_batches=0,
                    num_sanity_val_steps=0,
                    callbacks=callbacks,
                    logger=False,
                    accelerator="cpu",
                    devices=1,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    default_root_dir=root,
                )
                trainer.fit(module, datamodule)
    finally:
        torch.random.set_rng_state(state)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _epoch_progress(report: Callable[[int, int], None]) -> Any:
    """A callback that reports finished epochs (for the command line's progress bar)."""
    import lightning as L

    class EpochProgress(L.Callback):
        @override
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            report(trainer.current_epoch + 1, int(trainer.max_epochs or 0))

    return EpochProgress()


def _threat_model(callbacks: list[Any]) -> dict[str, Any]:
    """What the simulated attacker sees, as far as the callbacks can tell."""
    info: dict[str, Any] = {}
    for callback in callbacks:
        for attr in ("threat_model", "last_threat_model"):
            value = getattr(callback, attr, None)
            if isinstance(value, Mapping):
                info.update({str(k): v for k, v in value.items()})
        history = getattr(callback, "history", None)
        if isinstance(history, list):
            recorded = [
                h["threat_model"]
                for h in history
                if isinstance(h, Mapping) and isinstance(h.get("threat_model"), Mapping)
            ]
            if recorded:
                info.update({str(k): v for k, v in recorded[-1].items()})
        info.setdefault("callbacks", []).append(type(callback).__name__)
    return json.loads(json.dumps(info, default=str))


def safe_run_trial(
    spec_dict: Mapping[str, Any],
    out_dir: str,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """:func:`run_trial` that turns an exception into a ``status="failed: ..."`` result.

    A failed trial writes ``error.txt`` but no ``result.json``, so a rerun retries it.

    Example:
        >>> import tempfile
        >>> from lightning_privacy.sweep.config import TrialSpec
        >>> broken = TrialSpec("none", None, {}, {"training": {"seed": 0}})  # no data settings
        >>> with tempfile.TemporaryDirectory() as d:
        ...     result = safe_run_trial(broken.to_dict(), d)
        ...     (trial_dir(d, broken.trial_id) / "error.txt").is_file()
        True
        >>> result["status"]
        "failed: KeyError: 'data'"
    """
    try:
        return run_trial(spec_dict, out_dir, progress=progress)
    except Exception as err:  # one failing trial must not stop the sweep
        spec = TrialSpec.from_dict(spec_dict)
        directory = trial_dir(out_dir, spec.trial_id)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "error.txt").write_text(traceback.format_exc())
        log_event(out_dir, f"failed {spec.trial_id}: {err!r}")
        return TrialResult.failed(spec, f"{type(err).__name__}: {err}").to_dict()
