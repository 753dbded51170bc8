r"""``lightning-privacy audit membership``: reference models, offline LiRA and RMIA on a target.

A membership audit trains one *target* model and K *reference* models of the same architecture,
each on a random half of a data pool, through the sweep's runner (each model a task in a spawned
local process, ``workers`` at a time, or on Ray Tune), and caches what each model outputs on the
whole pool (``models/<id>/logits.pt`` plus ``result.json``: never the weights, never the data).
A rerun skips every model whose cache is there with the same fingerprint, so an interrupted audit
resumes, and audits whose targets differ (a DP-SGD target, another seed) share the reference
models. Then every attack scores the pool with the target's outputs -- members are the target's
half, non-members the other half; the reference-model attacks use, for each example, only the
reference models that did not train on it (offline) -- and the audit writes ``membership.json``,
``membership.csv`` and ``membership_roc.png`` (log-log ROC of every attack).

The file::

    name: photos-mlp
    data: {dataset: photos, image_size: 16, channels: 1, patches_per_photo: 300,
           population: 200, standardize: true, seed: 0}   # population: never trained on (RMIA)
    model: {name: mlp, width: 512, depth: 2}   # mlp, lenet, resnet18, vit_tiny, convnext_atto
    training: {epochs: 80, batch_size: 32, optimizer: adam, lr: 0.001, schedule: cosine, seed: 0}
    target:                                    # how the target trains (the references: plainly)
      defense: none                            # or dpsgd, with noise_multiplier or
      max_grad_norm: 1.0                       # target_epsilon (δ = 1 / (10 N))
      canaries: {num_canaries: 200, kind: input}   # optional: a one-run canary audit too
      lr: 0.01                                 # optional: the target's own lr, batch_size, epochs
    reference_models: 16
    attacks: [loss, confidence, entropy, modified_entropy, lira_offline, rmia]
    backend: local                             # or ray
    workers: 2

Every problem of the file is reported at once with its line and key, before anything runs.

Example:
    >>> config = parse_membership_config('''
    ... data: {dataset: digits, image_size: 8, population: 100}
    ... model: {name: mlp, width: 16}
    ... training: {epochs: 1}
    ... reference_models: 2
    ... attacks: [loss, lira_offline]
    ... ''')
    >>> [t.label for t in config.tasks()]
    ['target', 'reference 1', 'reference 2']
    >>> try:
    ...     parse_membership_config("reference_models: -1\nattacks: [los]")
    ... except SweepConfigError as err:
    ...     print(len(err.errors), err.errors[1].key)
    2 attacks[0]
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from rich.console import Console
from torch import Tensor, nn

from lightning_privacy._validation import describe
from lightning_privacy.membership import MEMBERSHIP_ATTACKS, MembershipQuery
from lightning_privacy.sweep.config import BACKENDS, SweepConfigError, _Located, check_backend
from lightning_privacy.sweep.results import write_atomic, write_json_atomic

__all__ = [
    "ATTACK_NAMES",
    "DATASETS",
    "MODELS",
    "MembershipAuditConfig",
    "ModelTask",
    "audit_target",
    "inclusion_mask",
    "load_membership_config",
    "load_pool",
    "parse_membership_config",
    "run_membership_audit",
    "safe_train_model",
    "train_model",
]

DATASETS = ("digits", "photos", "lfw")
MODELS = ("mlp", "lenet", "resnet18", "vit_tiny", "convnext_atto")
ATTACK_NAMES = ("loss", "confidence", "entropy", "modified_entropy", "lira_offline", "rmia")
MODELS_DIR = "models"
LOGITS_FILE = "logits.pt"
_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {
        "dataset": "photos",
        "image_size": 16,
        "channels": 1,
        "patches_per_photo": 300,
        "population": 200,
        "standardize": True,
        "seed": 0,
    },
    "model": {"name": "mlp", "width": 512, "depth": 2},
    "training": {
        "epochs": 80,
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 0.001,
        "schedule": "cosine",
        "weight_decay": 0.0,
        "seed": 0,
        "accelerator": "cpu",
    },
    "target": {
        "defense": "none",
        "noise_multiplier": None,
        "target_epsilon": None,
        "max_grad_norm": 1.0,
        "canaries": None,
        "lr": None,
        "batch_size": None,
        "epochs": None,
    },
}
#: Keys of ``target`` that replace the shared ``training`` value for the target only.
TARGET_TRAINING = ("lr", "batch_size", "epochs")
_REFERENCE = ("lira_offline", "rmia")
_TOP = ("name", "reference_models", "attacks", "backend", "workers", *_DEFAULTS)
_CHOICES = {
    ("data", "dataset"): DATASETS,
    ("model", "name"): MODELS,
    ("training", "optimizer"): ("adam", "sgd"),
    ("training", "schedule"): ("cosine", "constant"),
    ("training", "accelerator"): ("cpu", "cuda"),
    ("target", "defense"): ("none", "dpsgd"),
}
_POSITIVE_INTS = {
    ("data", "image_size"),
    ("data", "channels"),
    ("data", "patches_per_photo"),
    ("model", "width"),
    ("model", "depth"),
    ("training", "epochs"),
    ("training", "batch_size"),
}


# --------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ModelTask:
    """One model of an audit: the target (index 0) or reference model ``index``.

    Attributes:
        role: ``"target"`` or ``"reference"``.
        index: 0 for the target, 1..K for the reference models (it picks the model's half).
        settings: The ``data``, ``model``, ``training`` (and, for the target, ``target``)
            sections it trains with.

    Example:
        >>> task = ModelTask("reference", 3, {"data": {}, "model": {}, "training": {}})
        >>> task.label, ModelTask.from_dict(task.to_dict()) == task
        ('reference 3', True)
    """

    role: str
    index: int
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``"target"`` or ``"reference <index>"``."""
        return "target" if self.role == "target" else f"reference {self.index}"

    @property
    def fingerprint(self) -> str:
        """Hash of everything that determines the model's outputs (its cache key).

        ``training.accelerator: cpu`` (the default) is left out, so models cached before the key
        existed are reused.
        """
        content = asdict(self)
        training = dict(content["settings"].get("training") or {})
        if training.get("accelerator") == "cpu":
            del training["accelerator"]
            content["settings"] = {**content["settings"], "training": training}
        blob = json.dumps(content, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def trial_id(self) -> str:
        """Directory name under ``models/``: role, index and fingerprint."""
        return f"{self.role}-{self.index}-{self.fingerprint}"

    def to_dict(self) -> dict[str, Any]:
        """Plain, picklable, JSON-serialisable dict."""
        return json.loads(json.dumps(asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelTask:
        """Inverse of :meth:`to_dict`."""
        return cls(str(data["role"]), int(data["index"]), dict(data["settings"]))


@dataclass(frozen=True)
class MembershipAuditConfig:
    """A validated membership-audit file.

    Example:
        >>> config = parse_membership_config("reference_models: 4")
        >>> config.reference_models, config.attacks[-1], config.settings["model"]["name"]
        (4, 'rmia', 'mlp')
    """

    settings: Mapping[str, Any]
    reference_models: int = 16
    attacks: tuple[str, ...] = ATTACK_NAMES
    backend: str = "local"
    workers: int = 1
    name: str = "membership"

    def tasks(self) -> list[ModelTask]:
        """The target, then the reference models (which train without the target section)."""
        shared = {k: dict(self.settings[k]) for k in ("data", "model", "training")}
        target = ModelTask("target", 0, {**shared, "target": dict(self.settings["target"])})
        refs = [ModelTask("reference", k, shared) for k in range(1, self.reference_models + 1)]
        return [target, *refs]


def _error(doc: _Located, key: str, message: str) -> SweepConfigError:
    """An error at ``key``, located at it or at its nearest ancestor in the file (or nowhere)."""
    probe = key
    while probe and probe not in doc.lines:
        shorter = re.sub(r"(\.[^.\[]+|\[\d+\])$", "", probe)
        probe = "" if shorter == probe else shorter
    return SweepConfigError(message, key=key, line=doc.lines.get(probe), source=doc.source)


def _check_section(doc: _Located, name: str, raw: Any, errors: list[SweepConfigError]) -> dict:
    """One section with its defaults, every bad key and value recorded in ``errors``."""
    defaults = _DEFAULTS[name]
    if raw is None:
        return dict(defaults)
    if not isinstance(raw, dict):
        errors.append(
            _error(doc, name, f"Expected `{name}` to be a mapping, but got {describe(raw)}.")
        )
        return dict(defaults)
    for key in raw:
        if key not in defaults:
            allowed = ", ".join(repr(k) for k in defaults)
            errors.append(_error(doc, f"{name}.{key}", f"Unknown key {key!r}. Allowed: {allowed}."))
    merged = {**defaults, **{k: v for k, v in raw.items() if k in defaults}}
    for key, value in merged.items():
        problem = _value_problem(name, key, value)
        if problem is not None and key in raw:
            errors.append(_error(doc, f"{name}.{key}", problem))
    return merged


def _value_problem(section: str, key: str, value: Any) -> str | None:
    """What is wrong with one value (``None``: nothing)."""
    choices = _CHOICES.get((section, key))
    if choices is not None and value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        return f"Expected `{key}` to be one of {allowed}, but got {describe(value)}."
    if (section, key) == ("training", "accelerator") and value == "cuda":
        return _cuda_problem()
    optional = section == "target" and key in TARGET_TRAINING
    if optional and value is None:
        return None
    if ((section, key) in _POSITIVE_INTS or (optional and key != "lr")) and (
        isinstance(value, bool) or not isinstance(value, int) or value < 1
    ):
        return f"Expected `{key}` to be an int >= 1, but got {describe(value)}."
    numeric = {("training", "lr"), ("target", "max_grad_norm"), ("target", "noise_multiplier")}
    numeric |= {("target", "target_epsilon"), ("target", "lr")}
    if (section, key) in numeric and value is not None:
        bad = isinstance(value, bool) or not isinstance(value, (int, float))
        if bad or not math.isfinite(value) or value <= 0:
            return f"Expected `{key}` to be a finite float > 0, but got {describe(value)}."
    if (section, key) in {("data", "population"), ("data", "seed"), ("training", "seed")} and (
        isinstance(value, bool) or not isinstance(value, int) or value < 0
    ):
        return f"Expected `{key}` to be an int >= 0, but got {describe(value)}."
    return None


def _cuda_problem() -> str | None:
    """Why ``accelerator: cuda`` cannot train here (``None``: a GPU is there)."""
    if torch.cuda.is_available():
        return None
    return "Expected `accelerator` 'cuda' to find a GPU, but torch.cuda.is_available() is False."


def _check_top(doc: _Located, data: Mapping[str, Any], errors: list[SweepConfigError]) -> dict:
    """``reference_models``, ``attacks``, ``backend``, ``workers``, ``name``."""
    out: dict[str, Any] = {}
    refs = data.get("reference_models", 16)
    if isinstance(refs, bool) or not isinstance(refs, int) or refs < 0:
        errors.append(
            _error(
                doc,
                "reference_models",
                f"Expected `reference_models` to be an int >= 0, but got {describe(refs)}.",
            )
        )
        refs = 0
    out["reference_models"] = refs
    default = ATTACK_NAMES if refs >= 2 else tuple(a for a in ATTACK_NAMES if a not in _REFERENCE)
    attacks = data.get("attacks", list(default))
    if not isinstance(attacks, list) or not attacks:
        errors.append(
            _error(doc, "attacks", f"Expected a list of attacks, but got {describe(attacks)}.")
        )
        attacks = []
    for i, name in enumerate(attacks):
        if name not in MEMBERSHIP_ATTACKS:
            try:
                MEMBERSHIP_ATTACKS.get(name)
            except ValueError as err:
                errors.append(_error(doc, f"attacks[{i}]", str(err)))
        elif getattr(MEMBERSHIP_ATTACKS.get(name), "needs_reference", False) and refs < 2:
            errors.append(
                _error(
                    doc,
                    f"attacks[{i}]",
                    f"Attack {name!r} needs reference models: set `reference_models` to at least "
                    f"2 (16 or more for stable numbers), but it is {refs}.",
                )
            )
    out["attacks"] = tuple(a for a in attacks if a in MEMBERSHIP_ATTACKS)
    out["backend"] = data.get("backend", "local")
    if out["backend"] not in BACKENDS:
        errors.append(
            _error(
                doc,
                "backend",
                f"Expected `backend` to be one of {BACKENDS}, but got {describe(out['backend'])}.",
            )
        )
    workers = data.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        errors.append(
            _error(
                doc,
                "workers",
                f"Expected `workers` to be an int >= 1, but got {describe(workers)}.",
            )
        )
        workers = 1
    out["workers"] = workers
    out["name"] = str(data.get("name", "membership"))
    return out


def _check_target(doc: _Located, target: dict[str, Any], errors: list[SweepConfigError]) -> None:
    if target["defense"] == "dpsgd" and (target["noise_multiplier"] is None) == (
        target["target_epsilon"] is None
    ):
        errors.append(
            _error(
                doc,
                "target",
                "Expected exactly one of `noise_multiplier` and `target_epsilon` for a dpsgd "
                f"target, but got noise_multiplier={target['noise_multiplier']!r} and "
                f"target_epsilon={target['target_epsilon']!r}.",
            )
        )
    canaries = target.get("canaries")
    if canaries is None:
        return
    if not isinstance(canaries, dict) or set(canaries) - {"num_canaries", "kind", "seed"}:
        errors.append(
            _error(
                doc,
                "target.canaries",
                "Expected `canaries` to be a mapping with keys num_canaries, kind, seed, but got "
                f"{describe(canaries)}.",
            )
        )
        return
    from lightning_privacy.data.canaries import CANARY_KINDS

    if canaries.get("kind", "mislabeled") not in CANARY_KINDS:
        errors.append(
            _error(
                doc,
                "target.canaries.kind",
                f"Expected `kind` to be one of {CANARY_KINDS}, but got "
                f"{describe(canaries['kind'])}.",
            )
        )


def parse_membership_config(text: str, *, source: str = "<string>") -> MembershipAuditConfig:
    """Validate a membership-audit YAML text; every problem is reported at once.

    Raises:
        SweepConfigError: With the line and key of each problem.
    """
    doc = _Located(text, source)
    data = doc.data if isinstance(doc.data, dict) else {}
    errors: list[SweepConfigError] = []
    for key in data:
        if key not in _TOP:
            allowed = ", ".join(repr(k) for k in _TOP)
            errors.append(_error(doc, key, f"Unknown key {key!r}. Allowed: {allowed}."))
    settings = {name: _check_section(doc, name, data.get(name), errors) for name in _DEFAULTS}
    _check_target(doc, settings["target"], errors)
    top = _check_top(doc, data, errors)
    if errors:
        raise SweepConfigError.combine(errors)
    return MembershipAuditConfig(settings=settings, **top)


def load_membership_config(path: str | Path) -> MembershipAuditConfig:
    """:func:`parse_membership_config` of a file (errors name the file)."""
    return parse_membership_config(Path(path).read_text(), source=str(path))


# ------------------------------------------------------------------------------------ the data
def load_pool(data: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(pool_x, pool_y, population_x, population_y)`` of the ``data`` section.

    The data set is shuffled with ``data.seed``; the first ``population`` examples are the
    population (trained on by no model), the rest the pool the models draw their halves from.
    ``standardize`` maps the inputs to zero mean and unit variance (one mean and std for all).

    Example:
        >>> pool_x, pool_y, pop_x, _ = load_pool({"dataset": "digits", "image_size": 8,
        ...     "channels": 1, "population": 97, "standardize": True, "seed": 0})
        >>> len(pool_x), len(pop_x), round(float(torch.cat([pool_x, pop_x]).mean()), 6)
        (1700, 97, 0.0)
    """
    from lightning_privacy.data import load_digits_tensors, load_lfw_tensors, load_photo_patches

    size, channels = int(data["image_size"]), int(data["channels"])
    if data["dataset"] == "digits":
        x, y = load_digits_tensors(image_size=size, channels=channels)
    elif data["dataset"] == "lfw":
        x, y = load_lfw_tensors(image_size=size, channels=channels)
    else:
        x, y = load_photo_patches(
            image_size=size, channels=channels, patches_per_photo=int(data["patches_per_photo"])
        )
    if data.get("standardize", True):
        x = (x - x.mean()) / x.std()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(data["seed"])))
    x, y = x[order], y[order]
    p = int(data.get("population", 0))
    return x[p:], y[p:], x[:p], y[:p]


def inclusion_mask(pool_size: int, seed: int, index: int) -> Tensor:
    """Which pool examples model ``index`` trains on: a random half (exactly ``N // 2``).

    Example:
        >>> int(inclusion_mask(10, seed=0, index=3).sum())
        5
    """
    from lightning_privacy.functional.seeding import derive_seed

    generator = torch.Generator().manual_seed(derive_seed(seed, 0x494E434C, index))
    mask = torch.zeros(pool_size, dtype=torch.bool)
    mask[torch.randperm(pool_size, generator=generator)[: pool_size // 2]] = True
    return mask


# -------------------------------------------------------------------------------- one model
def _network(model: Mapping[str, Any], shape: Sequence[int], classes: int) -> nn.Module:
    """The architecture of the ``model`` section for inputs of ``shape`` (C, H, W)."""
    name = model["name"]
    if name == "mlp":
        width, layers = int(model["width"]), list[nn.Module]([nn.Flatten()])
        features = math.prod(shape)
        for _ in range(int(model["depth"])):
            layers += [nn.Linear(features, width), nn.ReLU()]
            features = width
        return nn.Sequential(*layers, nn.Linear(features, classes))
    if name == "lenet":
        from lightning_privacy.models import LeNetDLG

        return LeNetDLG(classes, channels=shape[0], image_size=shape[-1], init="default")
    from lightning_privacy.models.timm_models import build_timm_model

    return build_timm_model(name, num_classes=classes, in_chans=shape[0], image_size=shape[-1])


def _module(network: nn.Module, training: Mapping[str, Any]) -> Any:
    """A ``LitClassifier`` with the ``training`` section's optimizer and schedule."""
    from typing_extensions import override

    from lightning_privacy.models.lit import LitClassifier

    class AuditClassifier(LitClassifier):
        @override
        def configure_optimizers(self) -> Any:
            """LitClassifier's optimizer, with a cosine schedule over the epochs if asked."""
            optimizer = super().configure_optimizers()
            if training["schedule"] != "cosine":
                return optimizer
            epochs = int(training["epochs"])
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
            return {"optimizer": optimizer, "lr_scheduler": schedule}

    return AuditClassifier(
        network,
        lr=float(training["lr"]),
        optimizer=str(training["optimizer"]),
        weight_decay=float(training.get("weight_decay", 0.0)),
    )


def _callbacks(target: Mapping[str, Any] | None, epochs: int) -> list[Any]:
    """DP-SGD and the canary audit of a target, if its section asks for them."""
    from lightning_privacy.callbacks import DPSGD, CanaryAudit

    callbacks: list[Any] = []
    if target is not None and target["defense"] == "dpsgd":
        callbacks.append(
            DPSGD(
                max_grad_norm=float(target["max_grad_norm"]),
                noise_multiplier=target["noise_multiplier"],
                target_epsilon=target["target_epsilon"],
                epochs=epochs,
            )
        )
    if target is not None and target.get("canaries"):
        callbacks.append(CanaryAudit())
    return callbacks


def _fit(task: ModelTask, train_set: Any) -> tuple[Any, list[Any], float]:
    """Train the task's model on ``train_set``; the module, its callbacks and the seconds."""
    import lightning as L
    from torch.utils.data import DataLoader

    settings = task.settings
    target = settings.get("target") or {}
    training = {
        **settings["training"],
        **{k: target[k] for k in TARGET_TRAINING if target.get(k) is not None},
    }
    seed = int(training["seed"]) * 1000 + task.index
    L.seed_everything(seed, verbose=False)
    x0, _ = train_set[0]
    classes = _num_classes(settings["data"])
    module = _module(_network(settings["model"], tuple(x0.shape), classes), training)
    callbacks = _callbacks(settings.get("target"), int(training["epochs"]))
    loader = DataLoader(
        train_set,
        int(training["batch_size"]),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = L.Trainer(
        max_epochs=int(training["epochs"]),
        callbacks=callbacks,
        accelerator=str(training.get("accelerator", "cpu")),
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*validation_step.*but have no.*")
        warnings.filterwarnings("ignore", ".*Full backward hook is firing.*")
        trainer.fit(module, loader)
    return module, callbacks, time.perf_counter() - start


def _num_classes(data: Mapping[str, Any]) -> int:
    from lightning_privacy.data import PHOTO_NAMES

    return {"digits": 10, "lfw": 2, "photos": len(PHOTO_NAMES)}[str(data["dataset"])]


def _task_dir(out_dir: str | Path, task: ModelTask) -> Path:
    return Path(out_dir) / MODELS_DIR / task.trial_id


def train_model(task_dict: Mapping[str, Any], out_dir: str) -> dict[str, Any]:
    """Train one model of the audit and cache its outputs on the pool and the population.

    Writes ``models/<trial_id>/logits.pt`` (``(pool + population, classes)`` float32 logits)
    and ``result.json`` (accuracies, ε of a DP-SGD target, the canary audit, seconds). The
    examples themselves and the weights are not written.

    Returns:
        The ``result.json`` dict.
    """
    from torch.utils.data import TensorDataset

    from lightning_privacy.sweep.trial import quiet_lightning

    torch.set_num_threads(1)
    quiet_lightning()
    task = ModelTask.from_dict(task_dict)
    pool_x, pool_y, pop_x, _ = load_pool(task.settings["data"])
    keep = inclusion_mask(len(pool_x), int(task.settings["data"]["seed"]), task.index)
    train_set: Any = TensorDataset(pool_x[keep], pool_y[keep])
    canaries = (task.settings.get("target") or {}).get("canaries")
    if canaries:
        from lightning_privacy.data import with_canaries

        train_set = with_canaries(train_set, **canaries)
    module, callbacks, seconds = _fit(task, train_set)
    module.eval()
    with torch.no_grad():
        outputs = [module(x.to(module.device)) for x in (pool_x, pop_x)]
        logits = torch.cat(outputs).float().cpu()
    predictions = logits[: len(pool_x)].argmax(1) == pool_y
    result = {
        "trial_id": task.trial_id,
        "fingerprint": task.fingerprint,
        "role": task.role,
        "index": task.index,
        "status": "ok",
        "train_acc": float(predictions[keep].float().mean()),
        "test_acc": float(predictions[~keep].float().mean()),
        "seconds": seconds,
        **_privacy_of(callbacks),
    }
    directory = _task_dir(out_dir, task)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = _tensor_bytes(logits)
    write_atomic(directory / LOGITS_FILE, buffer)
    write_json_atomic(directory / "result.json", result)
    return result


def _tensor_bytes(tensor: Tensor) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def _privacy_of(callbacks: list[Any]) -> dict[str, Any]:
    """ε and δ of the DP-SGD target, and the canary audit's result."""
    from lightning_privacy.callbacks import DPSGD, CanaryAudit

    info: dict[str, Any] = {"epsilon": None, "delta": None, "canary_audit": None}
    for callback in callbacks:
        if isinstance(callback, DPSGD):
            info["epsilon"], info["delta"] = float(callback.epsilon), callback.delta
        if isinstance(callback, CanaryAudit) and callback.history:
            entry = callback.history[-1]
            info["canary_audit"] = {k: v for k, v in entry.items() if not k.startswith("audit/")}
            info["canary_audit"]["epsilon_lower_bound"] = entry.get("audit/epsilon_lower_bound")
    return info


def safe_train_model(task_dict: Mapping[str, Any], out_dir: str) -> dict[str, Any]:
    """:func:`train_model` that turns an exception into a ``status="failed: ..."`` result."""
    try:
        return train_model(task_dict, out_dir)
    except Exception as err:  # one failing model must not stop the others
        task = ModelTask.from_dict(task_dict)
        directory = _task_dir(out_dir, task)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "error.txt").write_text(traceback.format_exc())
        return {"trial_id": task.trial_id, "status": f"failed: {type(err).__name__}: {err}"}


def _cached(out_dir: Path, task: ModelTask) -> dict[str, Any] | None:
    """The result of a model trained before with the same fingerprint (``None``: train it)."""
    directory = _task_dir(out_dir, task)
    try:
        result = json.loads((directory / "result.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(result, dict) and result.get("fingerprint") == task.fingerprint
    return result if ok and (directory / LOGITS_FILE).is_file() else None


# ------------------------------------------------------------------------------ running them
def _run_ray_tasks(
    pending: list[ModelTask], out_dir: Path, workers: int, on_done: Callable[..., None]
) -> None:
    """The pending models as one Ray Tune grid, one CPU each (as the sweep's Ray backend).

    With ``training.accelerator: cuda`` each also asks for one GPU: Ray hides the GPUs from a
    task that asks for none.
    """
    import ray
    from ray import tune

    cuda = any(t.settings["training"].get("accelerator") == "cuda" for t in pending)
    resources: dict[str, float] = {"cpu": 1.0, "gpu": 1.0} if cuda else {"cpu": 1.0}

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(_ray_trainable, resources),
            param_space={
                "task": tune.grid_search([t.to_dict() for t in pending]),
                "out_dir": str(out_dir.resolve()),
            },
            tune_config=tune.TuneConfig(max_concurrent_trials=workers),
            run_config=tune.RunConfig(
                name="membership", storage_path=str((out_dir / "ray").resolve()), verbose=0
            ),
        )
        tuner.fit()
    finally:
        if started_here:
            ray.shutdown()
    for task in pending:
        on_done(task, _cached(out_dir, task) or {"status": "failed: no result"})


def _ray_trainable(config: dict[str, Any]) -> None:
    from ray import tune

    result = safe_train_model(config["task"], config["out_dir"])
    tune.report({k: v for k, v in result.items() if isinstance(v, (int, float, str))})


def run_models(
    config: MembershipAuditConfig,
    out_dir: str | Path,
    *,
    backend: str | None = None,
    workers: int | None = None,
    in_process: bool = False,
    console: Console | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Train every model of ``config`` not cached in ``out_dir``; every model's result by id.

    Raises:
        RuntimeError: If a model failed (its ``error.txt`` is in its folder); a rerun retries it.
    """
    from lightning_privacy.sweep.runner import _run_local, progress_bar

    backend = check_backend(backend or config.backend, key="--backend")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = config.tasks()
    results = {t.trial_id: r for t in tasks if (r := _cached(out, t)) is not None}
    pending = [t for t in tasks if t.trial_id not in results]
    console = console or Console(stderr=True)
    if results and progress:
        console.print(f"Resuming: {len(results)} cached model(s), {len(pending)} to train.")
    with progress_bar(console, disable=not progress) as bar:
        bar_task = bar.add_task(f"models ({backend})", total=len(tasks), completed=len(results))

        def on_done(task: ModelTask, result: Mapping[str, Any]) -> None:
            results[task.trial_id] = dict(result)
            bar.update(bar_task, advance=1, description=f"done {task.label}")

        if in_process:
            for task in pending:
                on_done(task, safe_train_model(task.to_dict(), str(out)))
        elif pending and backend == "ray":
            _run_ray_tasks(pending, out, workers or config.workers, on_done)
        elif pending:
            # the sweep's local runner: one spawned process per model, `workers` at a time
            _run_local(
                cast(Any, pending),
                out,
                workers or config.workers,
                safe_train_model,
                cast(Any, on_done),
            )
    failed = [
        f"{t.label}: {results[t.trial_id]['status']}"
        for t in tasks
        if results[t.trial_id].get("status") != "ok"
    ]
    if failed:
        raise RuntimeError("Some models failed (rerun to retry them): " + "; ".join(failed))
    return results


def _logits(out_dir: Path, task: ModelTask) -> Tensor:
    return torch.load(_task_dir(out_dir, task) / LOGITS_FILE, weights_only=True)


def _audit_query(
    config: MembershipAuditConfig, out_dir: Path
) -> tuple[MembershipQuery, Tensor, Tensor]:
    """The attacker's view of the pool: ``(query, members, audited)`` over the audited examples.

    ``audited``: the pool examples left out of at least one reference model (all without
    reference models); the reference attacks need one OUT model per example.
    """
    data = config.settings["data"]
    tasks = config.tasks()
    _, pool_y, _, pop_y = load_pool(data)
    n, seed = len(pool_y), int(data["seed"])
    target = _logits(out_dir, tasks[0])
    members = inclusion_mask(n, seed, 0)
    if len(tasks) == 1:
        return MembershipQuery(target[:n], pool_y), members, torch.ones(n, dtype=torch.bool)
    refs = torch.stack([_logits(out_dir, t) for t in tasks[1:]])
    out_mask = torch.stack([~inclusion_mask(n, seed, t.index) for t in tasks[1:]])
    audited = out_mask.any(0)
    query = MembershipQuery(
        target[:n][audited],
        pool_y[audited],
        reference_logits=refs[:, :n][:, audited],
        out_mask=out_mask[:, audited],
        population_logits=target[n:],
        population_targets=pop_y,
        population_reference_logits=refs[:, n:],
    )
    return query, members[audited], audited


def audit_target(
    config: MembershipAuditConfig, out_dir: str | Path, results: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Run every attack of ``config`` on the cached outputs; the audit as a JSON-able dict.

    Each attack's entry holds :func:`~lightning_privacy.functional.membership.membership_summary`
    (AUC with its DeLong interval, advantage, TPR at 1 % and 0.1 % FPR, the ε lower bound at the
    target's δ) plus a bootstrap 95 % interval of the TPR at 1 % FPR and the ROC curve.
    """
    from lightning_privacy.functional import membership as F

    out = Path(out_dir)
    tasks = config.tasks()
    target = dict(results[tasks[0].trial_id])
    query, members, audited = _audit_query(config, out)
    delta = target.get("delta") or 1e-5
    attacks: dict[str, Any] = {}
    for i, name in enumerate(config.attacks):
        scores = MEMBERSHIP_ATTACKS.create(name).score(query).double()
        inside, outside = scores[members], scores[~members]
        summary = F.membership_summary(inside, outside, delta=delta)
        low, high = F.bootstrap_interval(
            lambda a, b: F.tpr_at_fpr(a, b, 0.01),
            inside,
            outside,
            num_resamples=300,
            generator=torch.Generator().manual_seed(i),
        )
        fpr, tpr, _ = F.roc_curve(inside, outside)
        keep = torch.linspace(0, len(fpr) - 1, min(len(fpr), 400)).round().long().unique()
        attacks[name] = {
            **summary,
            "tpr_at_fpr_0.01_low": low,
            "tpr_at_fpr_0.01_high": high,
            "roc": {"fpr": fpr[keep.numpy()].tolist(), "tpr": tpr[keep.numpy()].tolist()},
        }
    refs = [dict(results[t.trial_id]) for t in tasks[1:]]
    return {
        "name": config.name,
        "target": target,
        "reference_models": len(refs),
        "reference_test_acc": sum(r["test_acc"] for r in refs) / len(refs) if refs else None,
        "members": int(members.sum()),
        "nonmembers": int((~members).sum()),
        "audited": int(audited.sum()),
        "delta": delta,
        "attacks": attacks,
        "settings": json.loads(json.dumps(config.settings, default=str)),
    }


#: The columns of ``membership.csv``, one row per attack.
MEMBERSHIP_COLUMNS = (
    "attack",
    "auc",
    "auc_low",
    "auc_high",
    "advantage",
    "tpr_at_fpr_0.01",
    "tpr_at_fpr_0.001",
    "epsilon_lower_bound",
)


def write_audit(audit: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """``membership.json``, ``membership.csv``, ``membership_roc.png`` and ``report.html``."""
    import csv
    import io

    from lightning_privacy.membership.plots import roc_figure
    from lightning_privacy.report import render_membership_report
    from lightning_privacy.sweep.pareto import figure_png

    out = Path(out_dir)
    written = [write_json_atomic(out / "membership.json", audit)]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(MEMBERSHIP_COLUMNS)
    for name, row in audit["attacks"].items():
        writer.writerow([name, *(row[c] for c in MEMBERSHIP_COLUMNS[1:])])
    written.append(write_atomic(out / "membership.csv", text.getvalue()))
    curves = {n: (r["roc"]["fpr"], r["roc"]["tpr"]) for n, r in audit["attacks"].items()}
    figure = roc_figure(
        curves, title=f"{audit['name']}: {audit['reference_models']} reference models"
    )
    roc_png = figure_png(figure)  # closes the figure
    written.append(write_atomic(out / "membership_roc.png", roc_png))
    page = render_membership_report(audit, roc_png)
    written.append(write_atomic(out / "report.html", page))
    return written


def run_membership_audit(
    config: MembershipAuditConfig,
    out_dir: str | Path,
    *,
    backend: str | None = None,
    workers: int | None = None,
    in_process: bool = False,
    console: Console | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or reuse) the models of ``config``, audit the target, write the outputs.

    Example:
        >>> import tempfile
        >>> config = parse_membership_config('''
        ... data: {dataset: digits, image_size: 8, population: 97}
        ... model: {name: mlp, width: 16, depth: 1}
        ... training: {epochs: 1, batch_size: 64}
        ... reference_models: 2
        ... attacks: [loss, lira_offline, rmia]
        ... ''')
        >>> with tempfile.TemporaryDirectory() as d:
        ...     audit = run_membership_audit(config, d, in_process=True, progress=False)
        ...     again = run_membership_audit(config, d, in_process=True, progress=False)
        >>> sorted(audit["attacks"]), audit["reference_models"], audit == again
        (['lira_offline', 'loss', 'rmia'], 2, True)
    """
    results = run_models(
        config,
        out_dir,
        backend=backend,
        workers=workers,
        in_process=in_process,
        console=console,
        progress=progress,
    )
    audit = audit_target(config, out_dir, results)
    write_audit(audit, out_dir)
    return audit
