r"""Sweep configuration: a YAML file validated completely before anything runs or is written.

A sweep is a grid over defenses and their strengths, trained and audited with the same settings.
Every problem is reported with the file, the line and the key it concerns, for example
``sweep.yaml, line 9, key `defenses[1].strengths[0]`: Expected `strength` to be a finite float
>= 0.0, but got -0.1 (float).``

The file::

    defenses:                      # required: the grid
      - name: none
      - name: gaussian_noise       # any name of lightning_privacy.defenses, or "dpsgd"
        strengths: [0.001, 0.01]   # the defense's main argument (std, ratio, rank, ...)
      - name: dpsgd
        strengths: [1.0]           # noise multiplier
        max_grad_norm: 1.0         # other keys are passed to the defense unchanged
        overrides:                 # optional: this entry's own data/model/training settings
          model: {lr: 0.03}        # (or dotted: `overrides: {model.lr: 0.03}`)
          data: {batch_size: 128}
    data: {dataset: digits, image_size: 32, batch_size: 64}
    model: {name: lenet, optimizer: adam, lr: 0.003}
    training: {epochs: 2, seed: 0}
    audit:                         # InversionAudit; `audit: null` disables it
      attack: deep_leakage         # any name of lightning_privacy.attacks
      num_samples: 1
      every_n_epochs: 1
      options: {max_iterations: 100}   # the attack's hyperparameters
    leakage:                       # LeakageMonitor (I²F); `leakage: null` disables it
      estimator: exact
      num_samples: 1
      every_n_epochs: 1
    backend: local                                    # or ray
    workers: 1

Example:
    >>> config = parse_sweep_config('''
    ... defenses:
    ...   - name: none
    ...   - name: gaussian_noise
    ...     strengths: [0.01, 0.1]
    ... ''')
    >>> [t.label for t in config.trials()]
    ['none', 'gaussian_noise=0.01', 'gaussian_noise=0.1']
    >>> dp = parse_sweep_config('''
    ... defenses:
    ...   - name: dpsgd
    ...     strengths: [1.0]
    ...     overrides: {model.lr: 0.03, data: {batch_size: 128}}
    ... ''').trials()[0]
    >>> dp.settings["model"]["lr"], dp.settings["data"]["batch_size"], dp.overrides
    (0.03, 128, {'data': {'batch_size': 128}, 'model': {'lr': 0.03}})
    >>> try:
    ...     parse_sweep_config("defenses:\n  - name: gausian_noise\n    strengths: [1]\n")
    ... except SweepConfigError as err:
    ...     print(err.line, err.key, str(err).split(": ", 1)[1][:63])
    2 defenses[0].name Unknown defense 'gausian_noise'. Did you mean 'gaussian_noise'?
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_privacy._validation import check_float, describe

#: The main argument ("strength") of each known defense, by name.
STRENGTH_PARAMETERS: dict[str, str] = {
    "gaussian_noise": "std",
    "laplace_noise": "scale",
    "gradient_clipping": "max_norm",
    "magnitude_pruning": "ratio",
    "random_pruning": "ratio",
    "low_rank": "rank",
    "dpsgd": "noise_multiplier",
}
#: Strengths that must be integers.
INTEGER_STRENGTHS = frozenset({"low_rank"})
#: Defense names that are not gradient transforms.
SPECIAL_DEFENSES = ("none", "dpsgd")

DATASETS = ("digits", "lfw")
MODELS = ("lenet", "resnet18")
OPTIMIZERS = ("sgd", "adam")
BACKENDS = ("local", "ray")
ESTIMATORS = ("exact", "expected", "lower_bound")

_SECTIONS: dict[str, dict[str, Any]] = {
    "data": {"dataset": "digits", "image_size": 32, "batch_size": 64, "val_fraction": 0.2},
    "model": {"name": "lenet", "optimizer": "adam", "lr": 0.003, "init": "uniform"},
    "training": {"epochs": 2, "seed": 0, "limit_train_batches": None},
    "audit": {
        "attack": "deep_leakage",
        "num_samples": 1,
        "every_n_epochs": 1,
        "max_seconds": None,
        "options": {},
    },
    "leakage": {
        "estimator": "exact",
        "num_samples": 1,
        "num_delta_samples": 1,
        "every_n_epochs": 1,
    },
}
_TOP_LEVEL = ("name", "defenses", "backend", "workers", *_SECTIONS)
#: Sections a ``defenses:`` entry may override for its own trials (``overrides:``).
OVERRIDABLE_SECTIONS = ("data", "model", "training")


class SweepConfigError(ValueError):
    """A sweep configuration problem, naming the file, line and key.

    Attributes:
        key: Dotted path of the offending key, e.g. ``defenses[1].strengths[0]``.
        line: 1-based line in the file, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        line: int | None = None,
        source: str = "<string>",
    ) -> None:
        where = source + (f", line {line}" if line is not None else "")
        where += f", key `{key}`" if key else ""
        super().__init__(f"{where}: {message}")
        self.key, self.line, self.source = key, line, source


@dataclass(frozen=True)
class TrialSpec:
    """One point of the grid plus the shared settings: everything a trial needs.

    Attributes:
        defense: ``"none"``, ``"dpsgd"`` or a registered defense name.
        strength: The defense's main argument, ``None`` for ``"none"``.
        options: Other keyword arguments of the defense.
        settings: The ``data``/``model``/``training``/``audit``/``leakage`` sections the trial
            runs with: the shared ones with the entry's ``overrides`` applied.
        overrides: The entry's own settings, ``{section: {key: value}}`` (already contained in
            ``settings``; kept to show what differs from the shared settings).

    Example:
        >>> spec = TrialSpec("dpsgd", 1.0, {}, {"model": {"lr": 0.03}}, {"model": {"lr": 0.03}})
        >>> spec.label, spec.overrides_text
        ('dpsgd=1', 'model.lr=0.03')
        >>> TrialSpec.from_dict(spec.to_dict()) == spec
        True
    """

    defense: str
    strength: float | None
    options: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Human-readable name, e.g. ``gaussian_noise=0.01``."""
        return self.defense if self.strength is None else f"{self.defense}={self.strength:g}"

    @property
    def fingerprint(self) -> str:
        """Hash of everything that determines the result.

        A finished trial is skipped on rerun only if its fingerprint is unchanged.
        """
        content = asdict(self)
        if not content["overrides"]:  # trials without overrides keep their old fingerprints
            del content["overrides"]
        blob = json.dumps(content, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def overrides_text(self) -> str:
        """The overridden settings as ``section.key=value``, comma-separated (``""`` if none)."""
        return ", ".join(
            f"{section}.{key}={value}"
            for section, values in self.overrides.items()
            for key, value in values.items()
        )

    @property
    def trial_id(self) -> str:
        """Directory name of the trial: label plus fingerprint."""
        safe = self.label.replace("=", "-").replace("/", "_")
        return f"{safe}-{self.fingerprint}"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, picklable and JSON-serialisable."""
        return json.loads(json.dumps(asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialSpec:
        """Inverse of :meth:`to_dict`."""
        overrides = {str(k): dict(v) for k, v in dict(data.get("overrides") or {}).items()}
        return cls(
            data["defense"],
            data["strength"],
            dict(data["options"]),
            dict(data["settings"]),
            overrides,
        )


@dataclass(frozen=True)
class DefenseGrid:
    """One ``defenses:`` entry: a defense, the strengths to try and its own settings."""

    name: str
    strengths: tuple[float | None, ...]
    options: Mapping[str, Any]
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: the grid, shared settings, backend and worker count."""

    defenses: tuple[DefenseGrid, ...]
    settings: Mapping[str, Any]
    backend: str = "local"
    workers: int = 1
    name: str = "sweep"

    def trials(self) -> list[TrialSpec]:
        """The grid, in file order, without duplicates."""
        seen: dict[str, TrialSpec] = {}
        for grid in self.defenses:
            settings = {
                k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.settings.items()
            }
            for section, values in grid.overrides.items():
                settings[section] = {**settings[section], **values}
            overrides = {k: dict(v) for k, v in grid.overrides.items()}
            for strength in grid.strengths:
                spec = TrialSpec(grid.name, strength, dict(grid.options), settings, overrides)
                seen.setdefault(spec.trial_id, spec)
        return list(seen.values())


def _known_defenses() -> list[str]:
    try:
        from lightning_privacy.defenses import list_defenses  # type: ignore[attr-defined]

        names = list(list_defenses())
    except ImportError:
        names = [n for n in STRENGTH_PARAMETERS if n not in SPECIAL_DEFENSES]
    return sorted(set(names) | set(SPECIAL_DEFENSES))


class _Located:
    """YAML data plus the line of every key path, from the composed node tree."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines: dict[str, int] = {}
        self._constructor = yaml.SafeLoader("")
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark
            raise SweepConfigError(
                f"Invalid YAML: {err.problem}.",
                line=None if mark is None else mark.line + 1,
                source=source,
            ) from None
        self.data = {} if node is None else self._build(node, "")

    def _build(self, node: yaml.Node, path: str) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = str(self._constructor.construct_object(key_node))
                child = f"{path}.{key}" if path else key
                self.lines[child] = key_node.start_mark.line + 1
                out[key] = self._build(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._build(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        return self._constructor.construct_object(node)

    def error(self, key: str, message: str) -> SweepConfigError:
        """An error at ``key``, or at its nearest ancestor with a known line."""
        probe = key
        while probe and probe not in self.lines:
            probe = re.sub(r"(\.[^.\[]+|\[\d+\])$", "", probe)
        return SweepConfigError(message, key=key, line=self.lines.get(probe), source=self.source)


def _unknown_keys(doc: _Located, section: Mapping[str, Any], allowed: Any, prefix: str) -> None:
    for key in section:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            options = ", ".join(repr(a) for a in allowed)
            raise doc.error(f"{prefix}{key}", f"Unknown key {key!r}.{hint} Allowed: {options}.")


def _check_mapping(doc: _Located, value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise doc.error(key, f"Expected `{key}` to be a mapping, but got {describe(value)}.")
    return value


def _check_number(
    doc: _Located,
    key: str,
    value: Any,
    *,
    name: str,
    integer: bool = False,
    positive: bool = False,
    optional: bool = False,
) -> Any:
    if value is None and optional:
        return None
    what = ("an int" if integer else "a finite float") + (" > 0" if positive else " >= 0.0")
    bad_type = isinstance(value, bool) or not isinstance(value, (int, float))
    if not bad_type and integer and not isinstance(value, int):
        bad_type = not float(value).is_integer()
    if bad_type or not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise doc.error(key, f"Expected `{name}` to be {what}, but got {describe(value)}.")
    return int(value) if integer else value


def _check_defense(doc: _Located, entry: Any, index: int, known: list[str]) -> DefenseGrid:
    base = f"defenses[{index}]"
    entry = _check_mapping(doc, entry, base)
    if "name" not in entry:
        raise doc.error(base, f"Missing required key `{base}.name` (one of {', '.join(known)}).")
    name = entry["name"]
    if not isinstance(name, str) or name not in known:
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise doc.error(
            f"{base}.name",
            f"Unknown defense {name!r}.{hint} Available: {', '.join(repr(k) for k in known)}.",
        )
    options = {
        k: v for k, v in entry.items() if k not in ("name", "strengths", "param", "overrides")
    }
    overrides = _check_overrides(doc, entry.get("overrides", {}), f"{base}.overrides")
    if name == "none":
        if "strengths" in entry:
            raise doc.error(f"{base}.strengths", "The defense 'none' takes no strengths.")
        if options:
            raise doc.error(f"{base}.{next(iter(options))}", "The defense 'none' takes no options.")
        return DefenseGrid(name, (None,), {}, overrides)
    if "strengths" not in entry:
        param = STRENGTH_PARAMETERS.get(name, "strength")
        raise doc.error(
            base,
            f"Missing required key `{base}.strengths`: a list of values of the defense's "
            f"`{param}`, e.g. `strengths: [0.01, 0.1]`.",
        )
    raw = entry["strengths"]
    if not isinstance(raw, list) or not raw:
        raise doc.error(
            f"{base}.strengths",
            f"Expected `strengths` to be a non-empty list of numbers, but got {describe(raw)}.",
        )
    strengths = tuple(
        _check_number(
            doc, f"{base}.strengths[{i}]", s, name="strength", integer=name in INTEGER_STRENGTHS
        )
        for i, s in enumerate(raw)
    )
    if name == "dpsgd":
        _unknown_keys(
            doc,
            options,
            ("max_grad_norm", "accountant", "target_delta", "poisson_sampling", "grad_sample_mode"),
            f"{base}.",
        )
        if "max_grad_norm" in options:
            _check_number(
                doc,
                f"{base}.max_grad_norm",
                options["max_grad_norm"],
                name="max_grad_norm",
                positive=True,
            )
    else:
        _check_transform(doc, name, strengths, options, base)
    return DefenseGrid(name, strengths, options, overrides)


def _check_overrides(doc: _Located, raw: Any, base: str) -> dict[str, dict[str, Any]]:
    """A defense entry's ``overrides:``, nested (``model: {lr: 0.03}``) or dotted (``model.lr``).

    Only the keys given are checked (with the same rules as the shared sections); they are merged
    into the shared settings when the grid is expanded.
    """
    if raw is None:
        return {}
    raw = _check_mapping(doc, raw, base)
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        section, dot, sub = str(key).partition(".")
        if section not in OVERRIDABLE_SECTIONS:
            _unknown_keys(doc, {key: None}, OVERRIDABLE_SECTIONS, f"{base}.")
        values = {sub: value} if dot else _check_mapping(doc, value, f"{base}.{section}")
        _unknown_keys(doc, values, _SECTIONS[section], f"{base}.{section}.")
        for name, item in values.items():
            if name in overrides.get(section, {}):
                raise doc.error(
                    f"{base}.{section}.{name}", f"`{section}.{name}` is overridden twice."
                )
            overrides.setdefault(section, {})[name] = item
    _check_core_values(doc, overrides, f"{base}.")
    return {section: overrides[section] for section in sorted(overrides)}


def _check_transform(
    doc: _Located, name: str, strengths: tuple[Any, ...], options: dict[str, Any], base: str
) -> None:
    """Build each transform once, so the component's own checks run before the sweep starts."""
    try:
        from lightning_privacy.defenses import create_defense  # type: ignore[attr-defined]
    except ImportError:
        return
    param = STRENGTH_PARAMETERS.get(name)
    if param is None:
        raise doc.error(f"{base}.name", f"The defense {name!r} has no known strength argument.")
    for i, strength in enumerate(strengths):
        try:
            create_defense(name, **{param: strength}, **options)
        except TypeError as err:
            raise doc.error(base, f"Invalid options for {name!r}: {err}") from None
        except ValueError as err:
            raise doc.error(f"{base}.strengths[{i}]", str(err)) from None


_CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": DATASETS,
    "model.name": MODELS,
    "model.optimizer": OPTIMIZERS,
}
#: ``key: (integer, positive, optional)`` of the numeric data/model/training settings.
_NUMBERS: dict[str, tuple[bool, bool, bool]] = {
    "data.image_size": (True, True, False),
    "data.batch_size": (True, True, False),
    "model.lr": (False, True, False),
    "training.epochs": (True, True, False),
    "training.seed": (True, False, False),
    "training.limit_train_batches": (True, True, True),
}


def _check_core_values(doc: _Located, sections: Mapping[str, Any], prefix: str) -> None:
    """Check the ``data``/``model``/``training`` values present in ``sections``.

    ``prefix`` locates them in the file (``""`` for the shared sections,
    ``defenses[i].overrides.`` for an entry's overrides).
    """
    for section in OVERRIDABLE_SECTIONS:
        for name, value in (sections.get(section) or {}).items():
            key = f"{section}.{name}"
            if key in _CHOICES and value not in _CHOICES[key]:
                allowed = ", ".join(repr(c) for c in _CHOICES[key])
                raise doc.error(
                    prefix + key,
                    f"Expected `{key}` to be one of {allowed}, but got {describe(value)}.",
                )
            if key == "data.val_fraction":
                try:
                    check_float(name, value, low=0.0, high=1.0, low_open=True, high_open=True)
                except (TypeError, ValueError) as err:
                    raise doc.error(prefix + key, str(err)) from None
            if key in _NUMBERS:
                integer, positive, optional = _NUMBERS[key]
                _check_number(
                    doc,
                    prefix + key,
                    value,
                    name=name,
                    integer=integer,
                    positive=positive,
                    optional=optional,
                )


def _check_settings(doc: _Located, data: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for section, defaults in _SECTIONS.items():
        raw = data.get(section, {})
        if raw is None and section in ("audit", "leakage"):
            settings[section] = None
            continue
        raw = _check_mapping(doc, raw if raw is not None else {}, section)
        _unknown_keys(doc, raw, defaults, f"{section}.")
        settings[section] = {**defaults, **raw}
    _check_core_values(doc, settings, "")
    audit = settings["audit"]
    if audit is not None:
        _check_number(
            doc,
            "audit.num_samples",
            audit["num_samples"],
            name="num_samples",
            integer=True,
            positive=True,
        )
        _check_number(
            doc,
            "audit.max_seconds",
            audit["max_seconds"],
            name="max_seconds",
            positive=True,
            optional=True,
        )
        _check_number(
            doc,
            "audit.every_n_epochs",
            audit["every_n_epochs"],
            name="every_n_epochs",
            integer=True,
            positive=True,
        )
        _check_mapping(doc, audit["options"], "audit.options")
        _check_attack(doc, audit["attack"], audit["options"])
    leakage = settings["leakage"]
    if leakage is not None:
        for key in ("num_samples", "num_delta_samples", "every_n_epochs"):
            _check_number(
                doc, f"leakage.{key}", leakage[key], name=key, integer=True, positive=True
            )
    if leakage is not None and leakage["estimator"] not in ESTIMATORS:
        allowed = ", ".join(repr(c) for c in ESTIMATORS)
        raise doc.error(
            "leakage.estimator",
            f"Expected `leakage.estimator` to be one of "
            f"{allowed}, but got {describe(leakage['estimator'])}.",
        )
    return settings


def _check_attack(doc: _Located, attack: Any, options: dict[str, Any]) -> None:
    try:
        from lightning_privacy.attacks import (  # type: ignore[attr-defined]
            create_attack,
            list_attacks,
        )
    except ImportError:
        if not isinstance(attack, str):
            raise doc.error(
                "audit.attack",
                f"Expected `audit.attack` to be an attack name, but got {describe(attack)}.",
            ) from None
        return
    names = list(list_attacks())
    if attack not in names:
        close = difflib.get_close_matches(str(attack), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise doc.error(
            "audit.attack",
            f"Unknown attack {attack!r}.{hint} Available: {', '.join(repr(n) for n in names)}.",
        )
    try:  # the attack's own checks, before anything runs
        create_attack(attack, **options)
    except TypeError as err:
        raise doc.error("audit.options", f"Invalid options for {attack!r}: {err}") from None
    except ValueError as err:
        raise doc.error("audit.options", str(err)) from None


def ray_available() -> bool:
    """Whether Ray Tune can be imported (the optional ``ray`` extra).

    Example:
        >>> isinstance(ray_available(), bool)
        True
    """
    try:
        import ray  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError:
        return False
    return True


def check_backend(
    backend: Any,
    *,
    key: str = "backend",
    doc: _Located | None = None,
    source: str = "<command line>",
) -> str:
    """Validate a backend name and, for ``"ray"``, that Ray Tune is installed.

    Example:
        >>> check_backend("local")
        'local'
    """

    def fail(message: str) -> SweepConfigError:
        if doc is not None:
            return doc.error(key, message)
        return SweepConfigError(message, key=key, source=source)

    if backend not in BACKENDS:
        allowed = ", ".join(repr(b) for b in BACKENDS)
        raise fail(f"Expected `backend` to be one of {allowed}, but got {describe(backend)}.")
    if backend == "ray" and not ray_available():
        raise fail(
            "The 'ray' backend needs Ray Tune, which is not installed. Install the optional "
            "extra with `pip install 'lightning-privacy[ray]'`, or use `backend: local`."
        )
    return str(backend)


def parse_sweep_config(
    text: str, *, source: str = "<string>", backend: str | None = None
) -> SweepConfig:
    """Validate a sweep configuration given as YAML text.

    Args:
        text: The YAML document.
        source: File name used in messages.
        backend: Overrides the file's ``backend`` (the command line's ``--backend``).

    Raises:
        SweepConfigError: On the first problem, naming the line and key.
    """
    doc = _Located(text, source)
    data = doc.data
    if not isinstance(data, dict):
        raise SweepConfigError("Expected a mapping at the top level.", line=1, source=source)
    _unknown_keys(doc, data, _TOP_LEVEL, "")
    if "defenses" not in data:
        raise SweepConfigError(
            "Missing required key `defenses`: a list of entries such as "
            "`- {name: gaussian_noise, strengths: [0.01, 0.1]}`.",
            key="defenses",
            source=source,
        )
    raw_defenses = data["defenses"]
    if not isinstance(raw_defenses, list) or not raw_defenses:
        raise doc.error(
            "defenses",
            f"Expected `defenses` to be a non-empty list, but got {describe(raw_defenses)}.",
        )
    known = _known_defenses()
    grids = tuple(_check_defense(doc, e, i, known) for i, e in enumerate(raw_defenses))
    settings = _check_settings(doc, data)
    workers = _check_number(
        doc, "workers", data.get("workers", 1), name="workers", integer=True, positive=True
    )
    name = str(data.get("name", "sweep"))
    if backend is None:
        chosen = check_backend(data.get("backend", "local"), doc=doc)
    else:
        chosen = check_backend(backend, key="--backend", source="<command line>")
    return SweepConfig(grids, settings, chosen, workers, name)


def load_sweep_config(path: str | Path, *, backend: str | None = None) -> SweepConfig:
    r"""Read and validate a sweep configuration file (see :func:`parse_sweep_config`).

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "s.yaml")
        ...     _ = open(p, "w").write("defenses: [{name: none}]\n")
        ...     load_sweep_config(p).backend
        'local'
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SweepConfigError(
            f"Cannot read the sweep configuration: {err.strerror}.", source=str(path)
        ) from None
    return parse_sweep_config(text, source=str(path), backend=backend)
