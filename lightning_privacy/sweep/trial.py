"""One trial of a sweep: train, defend, audit, and write ``result.json`` atomically.

The same :func:`run_trial` runs in a local process, in the demo's own process and inside a Ray
Tune worker, so every backend produces the same files. A trial is finished exactly when its
``result.json`` exists with the trial's fingerprint; a rerun skips it.

Example:
    >>> from lightning_privacy.sweep.config import TrialSpec
    >>> spec = TrialSpec("gaussian_noise", 0.1)
    >>> build_transforms(spec)[0].std if build_transforms(spec) else 0.1
    0.1
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_privacy.sweep.config import STRENGTH_PARAMETERS, TrialSpec

RESULT_FILE = "result.json"
EVENTS_FILE = "events.log"
#: Columns of ``results.csv``, in order.
RESULT_COLUMNS = (
    "trial_id",
    "defense",
    "strength",
    "val_acc",
    "epsilon",
    "attack_psnr",
    "attack_ssim",
    "predicted_psnr",
    "seconds",
    "status",
)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _callback_class(name: str) -> Any:
    """The callback class ``name`` if its issue has landed, else ``None``."""
    try:
        import lightning_privacy.callbacks as callbacks
    except ImportError:  # pragma: no cover - the package always exists
        return None
    return getattr(callbacks, name, None)


def build_transforms(spec: TrialSpec) -> list[Any]:
    """The gradient transforms of a trial (empty for ``none`` and ``dpsgd``).

    Returns an empty list when the defense registry is not available yet.
    """
    if spec.defense in ("none", "dpsgd"):
        return []
    try:
        from lightning_privacy.defenses import create_defense  # type: ignore[attr-defined]
    except ImportError:
        return []
    param = STRENGTH_PARAMETERS[spec.defense]
    return [create_defense(spec.defense, **{param: spec.strength}, **dict(spec.options))]


def build_callbacks(spec: TrialSpec) -> tuple[list[Any], list[str]]:
    """Callbacks of a trial and the names of the pieces that are not available (yet).

    Example:
        >>> from lightning_privacy.sweep.config import TrialSpec
        >>> callbacks, missing = build_callbacks(TrialSpec("none", None, {}, {}))
        >>> isinstance(callbacks, list) and isinstance(missing, list)
        True
    """
    callbacks: list[Any] = []
    missing: list[str] = []
    settings = spec.settings
    if spec.defense == "dpsgd":
        dpsgd = _callback_class("DPSGD")
        if dpsgd is None:
            missing.append("DPSGD")
        else:
            options = dict(spec.options)
            options.setdefault("max_grad_norm", 1.0)
            callbacks.append(dpsgd(noise_multiplier=spec.strength, **options))
    elif spec.defense != "none":
        defense = _callback_class("GradientDefense")
        transforms = build_transforms(spec)
        if defense is None or not transforms:
            missing.append("GradientDefense")
        else:
            callbacks.append(defense(transforms, seed=int(settings.get("training", {})["seed"])))
    audit_settings = settings.get("audit")
    if audit_settings is not None:
        audit = _callback_class("InversionAudit")
        if audit is None:
            missing.append("InversionAudit")
        else:
            attack: Any = audit_settings["attack"]
            if audit_settings.get("options"):
                from lightning_privacy.attacks import create_attack  # type: ignore[attr-defined]

                attack = create_attack(attack, **audit_settings["options"])
            callbacks.append(
                audit(
                    attack,
                    every_n_epochs=int(audit_settings["every_n_epochs"]),
                    num_samples=int(audit_settings["num_samples"]),
                    max_seconds=audit_settings.get("max_seconds"),
                    seed=int(settings["training"]["seed"]),
                )
            )
    leakage_settings = settings.get("leakage")
    if leakage_settings is not None:
        monitor = _callback_class("LeakageMonitor")
        if monitor is None:
            missing.append("LeakageMonitor")
        else:
            callbacks.append(
                monitor(
                    every_n_epochs=int(leakage_settings["every_n_epochs"]),
                    num_samples=int(leakage_settings["num_samples"]),
                    estimator=leakage_settings["estimator"],
                    num_delta_samples=int(leakage_settings["num_delta_samples"]),
                    seed=int(settings["training"]["seed"]),
                )
            )
    return callbacks, missing


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
        def name(self) -> str:
            return "memory"

        @property
        def version(self) -> str:
            return "0"

        @property
        def save_dir(self) -> str:
            return str(self.root)

        @property
        def log_dir(self) -> str:
            return str(self.root)

        @property
        @rank_zero_experiment
        def experiment(self) -> None:
            return None

        @rank_zero_only
        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            return None

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
    """Silence Lightning's per-Trainer banners (GPU available, tips); warnings still show."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_privacy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")


def log_event(out_dir: Path, message: str) -> None:
    """Append one line to the sweep's ``events.log`` (trial starts, finishes, skips)."""
    with open(out_dir / EVENTS_FILE, "a") as handle:
        handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader never sees a partial file (write, then rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def load_finished(out_dir: Path, spec: TrialSpec) -> dict[str, Any] | None:
    """The stored result of ``spec`` if it finished with the same fingerprint, else ``None``."""
    path = out_dir / "trials" / spec.trial_id / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if result.get("fingerprint") == spec.fingerprint else None


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
        The result: ``val_acc``, ``epsilon``, ``attack_psnr``, ``attack_ssim``,
        ``predicted_psnr``, ``seconds``, the logged ``history``, the ``threat_model`` and the
        ``overrides`` the trial ran with (``"model.lr=0.03, data.batch_size=128"``, or ``""``).
    """
    import lightning as L

    torch.set_num_threads(1)
    quiet_lightning()
    spec = TrialSpec.from_dict(spec_dict)
    root = Path(out_dir)
    trial_dir = root / "trials" / spec.trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    log_event(root, f"start {spec.trial_id}")
    settings = spec.settings
    L.seed_everything(int(settings["training"]["seed"]), verbose=False)
    module, datamodule = _build_model_and_data(settings)
    callbacks, missing = build_callbacks(spec)
    if {"DPSGD", "GradientDefense"} & set(missing):
        log_event(root, f"unavailable {spec.trial_id}")
        return _unavailable(spec, missing)
    extra = [] if progress is None else [_epoch_progress(progress)]
    logger = _memory_logger_class()(trial_dir)
    limit = settings["training"].get("limit_train_batches")
    trainer = L.Trainer(
        max_epochs=int(settings["training"]["epochs"]),
        limit_train_batches=limit if limit is not None else 1.0,
        callbacks=callbacks + extra,
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=str(trial_dir),
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, datamodule)
    seconds = time.perf_counter() - start
    messages = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
    history = {k: v for k, v in logger.history.items()}
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    epsilon = metrics.get("privacy/epsilon", _last(history, "privacy/epsilon"))
    if epsilon is None and spec.defense == "none":
        epsilon = math.inf
    result: dict[str, Any] = {
        "trial_id": spec.trial_id,
        "fingerprint": spec.fingerprint,
        "label": spec.label,
        "defense": spec.defense,
        "strength": spec.strength,
        "overrides": spec.overrides_text,
        "val_acc": metrics.get("val/acc"),
        "epsilon": _finite_or_none(epsilon),
        "attack_psnr": metrics.get("attack/psnr", _last(history, "attack/psnr")),
        "attack_ssim": metrics.get("attack/ssim", _last(history, "attack/ssim")),
        "predicted_psnr": metrics.get(
            "leakage/predicted_psnr", _last(history, "leakage/predicted_psnr")
        ),
        "seconds": seconds,
        "status": "ok",
        "missing": missing,
        "warnings": messages,
        "threat_model": _threat_model(callbacks),
        "history": history,
        "images": sorted(
            str(p.relative_to(trial_dir))
            for p in trial_dir.rglob("*")
            if p.suffix.lower() in _IMAGE_SUFFIXES
        ),
        "spec": spec.to_dict(),
    }
    write_json_atomic(trial_dir / RESULT_FILE, result)
    log_event(root, f"finish {spec.trial_id}")
    return result


def _epoch_progress(report: Callable[[int, int], None]) -> Any:
    """A callback that reports finished epochs (for the command line's progress bar)."""
    import lightning as L

    class EpochProgress(L.Callback):
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


def _unavailable(spec: TrialSpec, missing: list[str]) -> dict[str, Any]:
    """The result of a trial whose defense is not available: nothing trained, nothing stored."""
    return {
        "trial_id": spec.trial_id,
        "label": spec.label,
        "defense": spec.defense,
        "strength": spec.strength,
        "overrides": spec.overrides_text,
        "status": "unavailable: " + ", ".join(missing),
        "missing": missing,
        "history": {},
    }


def safe_run_trial(
    spec_dict: Mapping[str, Any],
    out_dir: str,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """:func:`run_trial` that turns an exception into a ``status="failed"`` result.

    A failed trial writes ``error.txt`` but no ``result.json``, so a rerun retries it.
    """
    try:
        return run_trial(spec_dict, out_dir, progress=progress)
    except Exception as err:  # one failing trial must not stop the sweep
        spec = TrialSpec.from_dict(spec_dict)
        trial_dir = Path(out_dir) / "trials" / spec.trial_id
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / "error.txt").write_text(traceback.format_exc())
        log_event(Path(out_dir), f"failed {spec.trial_id}: {err!r}")
        return {
            "trial_id": spec.trial_id,
            "label": spec.label,
            "defense": spec.defense,
            "strength": spec.strength,
            "overrides": spec.overrides_text,
            "status": f"failed: {type(err).__name__}: {err}",
            "history": {},
        }
