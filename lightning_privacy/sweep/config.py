r"""Sweep configuration: a YAML file validated completely before anything runs or is written.

A sweep is a grid over defenses and their strengths, trained and audited with the same settings.
Every problem is reported with the file, the line and the key it concerns, for example
``sweep.yaml, line 9, key `defenses[1].strengths[0]`: Expected `strength` to be a finite float
>= 0.0, but got -0.1 (float).``

The file::

    defenses:                      # required: the grid
      - name: none
      - name: gaussian_noise       # any name of lightning_privacy.defenses, or "dpsgd"
        strengths: [0.001, 0.01]   # values of the class's `strength` (std, ratio, rank, ...)
      - name: dpsgd
        strengths: [1.0]           # noise multiplier
        max_grad_norm: 1.0         # other keys: the component's arguments, passed unchanged
        overrides:                 # optional: this entry's own data/model/training settings
          model: {lr: 0.03}        # (or dotted: `overrides: {model.lr: 0.03}`)
          data: {batch_size: 128}
    data: {dataset: digits, image_size: 32, batch_size: 64}
    model: {name: lenet, optimizer: adam, lr: 0.003}
    training: {epochs: 2, seed: 0}
    audit:                         # InversionAudit's arguments; `audit: null` disables it
      attack: deep_leakage         # any name of lightning_privacy.attacks
      num_samples: 1
      every_n_epochs: 1
      options: {max_iterations: 100}   # the attack's hyperparameters
    leakage:                       # LeakageMonitor's (I²F); `leakage: null` disables it
      estimator: exact
      num_samples: 1
      every_n_epochs: 1
    backend: local                                    # or ray
    workers: 1

What a defense, the audit and the leakage monitor accept is read from the components
(:mod:`lightning_privacy.sweep.components`), and every one of them is built once while the file
is validated, so their own checks report a bad value at its line.

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

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lightning_privacy._registry import suggestion
from lightning_privacy._validation import check_float, describe
from lightning_privacy.attacks import ATTACKS, create_attack
from lightning_privacy.sweep.components import (
    ATTACK_KEYS,
    SPECIAL_DEFENSES,
    audit_arguments,
    audit_callback,
    defense_callback,
    defense_names,
    defense_options,
    integer_strength,
    leakage_arguments,
    leakage_callback,
    strength_parameter,
)
from lightning_privacy.sweep.components import STRENGTH_PARAMETERS as STRENGTH_PARAMETERS

DATASETS = ("digits", "lfw")
MODELS = ("lenet", "resnet18")
OPTIMIZERS = ("sgd", "adam")
BACKENDS = ("local", "ray")

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
#: Keys of a ``defenses:`` entry that are not the component's arguments.
_ENTRY_KEYS = ("name", "strengths", "param", "overrides")
#: The seed the defenses are built with during validation (``training.seed`` is checked apart).
_VALIDATION_SEED = 0
#: Sections a ``defenses:`` entry may override for its own trials (``overrides:``).
OVERRIDABLE_SECTIONS = ("data", "model", "training")


class SweepConfigError(ValueError):
    """A sweep configuration problem, naming the file, line and key.

    Attributes:
        key: Dotted path of the offending key, e.g. ``defenses[1].strengths[0]``.
        line: 1-based line in the file, when known.

    Example:
        >>> str(SweepConfigError("Bad.", key="workers", line=3, source="s.yaml"))
        's.yaml, line 3, key `workers`: Bad.'
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


def format_overrides(overrides: Mapping[str, Mapping[str, Any]]) -> str:
    """Overridden settings ``{section: {key: value}}`` as ``section.key=value, ...``.

    Example:
        >>> format_overrides({"data": {"batch_size": 128}, "model": {"lr": 0.03}})
        'data.batch_size=128, model.lr=0.03'
    """
    return ", ".join(
        f"{section}.{key}={value}"
        for section, values in overrides.items()
        for key, value in values.items()
    )


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
        return format_overrides(self.overrides)

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
    """One ``defenses:`` entry: a defense, the strengths to try and its own settings.

    Example:
        >>> grid = parse_sweep_config("defenses: [{name: low_rank, strengths: [1, 2.0]}]")
        >>> grid.defenses[0].strengths
        (1, 2)
    """

    name: str
    strengths: tuple[float | None, ...]
    options: Mapping[str, Any]
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: the grid, shared settings, backend and worker count.

    Example:
        >>> config = parse_sweep_config("{defenses: [{name: none}], workers: 2}")
        >>> config.backend, config.workers, config.settings["leakage"]["num_samples"]
        ('local', 2, 1)
    """

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


def _suggestion(value: Any, allowed: Any) -> str:
    """`` Did you mean 'x'?`` for the closest of ``allowed`` (or a synonym of it), or ``""``."""
    return suggestion(str(value), [str(a) for a in allowed])


def _unknown_keys(doc: _Located, section: Mapping[str, Any], allowed: Any, prefix: str) -> None:
    for key in section:
        if key not in allowed:
            options = ", ".join(repr(a) for a in allowed) or "none"
            raise doc.error(
                f"{prefix}{key}",
                f"Unknown key {key!r}.{_suggestion(key, allowed)} Allowed: {options}.",
            )


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


#: An argument named in a component's message (``Expected `std` to be ...``).
_ARGUMENT = re.compile(r"`([A-Za-z_]\w*)`")

T = TypeVar("T")


def _build(
    doc: _Located, build: Callable[[], T], *, what: str, keys: Mapping[str, str], fallback: str
) -> T:
    """Run a component's constructor; its error is raised at the key of the argument it names.

    Args:
        doc: The file, for the line of the key.
        build: Builds the component with the file's values.
        what: The component, for a message that names no argument.
        keys: ``{argument: key in the file}``, searched in order (options before the strength).
        fallback: The key of an error that names none of ``keys``.
    """
    try:
        return build()
    except (TypeError, ValueError, ImportError) as err:
        message = str(err)
        named = set(_ARGUMENT.findall(message))
        key = next((key for argument, key in keys.items() if argument in named), None)
        if key is None and isinstance(err, TypeError):
            message = f"Invalid options for {what!r}: {message}"
        raise doc.error(key or fallback, message) from None


def _check_defense_name(doc: _Located, entry: dict[str, Any], base: str) -> str:
    known = defense_names()
    if "name" not in entry:
        raise doc.error(base, f"Missing required key `{base}.name` (one of {', '.join(known)}).")
    name = entry["name"]
    if not isinstance(name, str) or name not in known:
        raise doc.error(
            f"{base}.name",
            f"Unknown defense {name!r}.{_suggestion(name, known)} "
            f"Available: {', '.join(repr(k) for k in known)}.",
        )
    if name not in SPECIAL_DEFENSES and strength_parameter(name) is None:
        raise doc.error(
            f"{base}.name",
            f"The defense {name!r} declares no `strength` (the argument a sweep varies): give "
            "its class a `strength` ClassVar naming it.",
        )
    return name


def _check_strengths(doc: _Located, entry: dict[str, Any], name: str, base: str) -> tuple[Any, ...]:
    if "strengths" not in entry:
        raise doc.error(
            base,
            f"Missing required key `{base}.strengths`: a list of values of the defense's "
            f"`{strength_parameter(name)}`, e.g. `strengths: [0.01, 0.1]`.",
        )
    raw = entry["strengths"]
    if not isinstance(raw, list) or not raw:
        raise doc.error(
            f"{base}.strengths",
            f"Expected `strengths` to be a non-empty list of numbers, but got {describe(raw)}.",
        )
    integer = integer_strength(name)
    return tuple(
        _check_number(doc, f"{base}.strengths[{i}]", s, name="strength", integer=integer)
        for i, s in enumerate(raw)
    )


def _check_defense_options(
    doc: _Located, name: str, strengths: tuple[Any, ...], options: dict[str, Any], base: str
) -> None:
    """Build the entry's component at every strength, so its own checks run before training."""
    allowed = defense_options(name)
    if allowed is not None:
        _check_option_names(doc, name, options, allowed, base)
    keys = {option: f"{base}.{option}" for option in options}
    for i, strength in enumerate(strengths):
        build = partial(defense_callback, name, strength, options, seed=_VALIDATION_SEED)
        located = {**keys, str(strength_parameter(name)): f"{base}.strengths[{i}]"}
        _build(doc, build, what=name, keys=located, fallback=base)


def _check_option_names(
    doc: _Located, name: str, options: Mapping[str, Any], allowed: tuple[str, ...], base: str
) -> None:
    """Unknown option keys, with the closest allowed one; the strength goes in ``strengths``."""
    strength = str(strength_parameter(name))
    for key in options:
        if key in allowed:
            continue
        listed = ", ".join(repr(a) for a in allowed) or "none"
        hint = _suggestion(key, allowed)
        if key == strength or (not hint and _suggestion(key, (strength,))):
            hint = (
                f" Values of `{strength}` (the defense's strength) go in `strengths:`, "
                "e.g. `strengths: [0.1]`."
            )
        raise doc.error(
            f"{base}.{key}",
            f"Unknown key {key!r} for the defense {name!r}.{hint} Allowed besides "
            f"`name`, `strengths` and `overrides`: {listed}.",
        )


def _check_defense(doc: _Located, entry: Any, index: int) -> DefenseGrid:
    base = f"defenses[{index}]"
    entry = _check_mapping(doc, entry, base)
    name = _check_defense_name(doc, entry, base)
    options = {k: v for k, v in entry.items() if k not in _ENTRY_KEYS}
    overrides = _check_overrides(doc, entry.get("overrides", {}), f"{base}.overrides")
    if name == "none":
        if "strengths" in entry:
            raise doc.error(f"{base}.strengths", "The defense 'none' takes no strengths.")
        if options:
            raise doc.error(f"{base}.{next(iter(options))}", "The defense 'none' takes no options.")
        return DefenseGrid(name, (None,), {}, overrides)
    strengths = _check_strengths(doc, entry, name, base)
    _check_defense_options(doc, name, strengths, options, base)
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


def _allowed_keys(section: str) -> tuple[str, ...]:
    """A shared section's keys: its defaults, and for audit/leakage the callback's arguments."""
    derived = {"audit": audit_arguments, "leakage": leakage_arguments}.get(section)
    return tuple(dict.fromkeys([*_SECTIONS[section], *(derived() if derived else ())]))


def _check_settings(doc: _Located, data: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for section, defaults in _SECTIONS.items():
        raw = data.get(section, {})
        if raw is None and section in ("audit", "leakage"):
            settings[section] = None
            continue
        raw = _check_mapping(doc, raw if raw is not None else {}, section)
        _unknown_keys(doc, raw, _allowed_keys(section), f"{section}.")
        settings[section] = {**defaults, **raw}
    _check_core_values(doc, settings, "")
    seed = settings["training"]["seed"]
    if settings["audit"] is not None:
        _check_audit(doc, settings["audit"], seed)
    if settings["leakage"] is not None:
        leakage = settings["leakage"]
        build = partial(leakage_callback, leakage, seed=seed)
        keys = {name: f"leakage.{name}" for name in leakage}
        _build(doc, build, what="LeakageMonitor", keys=keys, fallback="leakage")
    return settings


def _check_audit(doc: _Located, audit: dict[str, Any], seed: int) -> None:
    """The attack's name, its options (the attack's own checks), then ``InversionAudit``'s."""
    attack, options = audit["attack"], _check_mapping(doc, audit["options"], "audit.options")
    _build(doc, partial(ATTACKS.get, attack), what="audit", keys={}, fallback="audit.attack")
    build_attack = partial(create_attack, attack, **options)
    _build(doc, build_attack, what=str(attack), keys={}, fallback="audit.options")
    build = partial(audit_callback, audit, seed=seed)
    keys = {name: f"audit.{name}" for name in audit if name not in ATTACK_KEYS}
    _build(doc, build, what="InversionAudit", keys=keys, fallback="audit")


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

    Example:
        >>> text = "defenses: [{name: dpsgd, strengths: [1.0], accountant: foo}]"
        >>> try:
        ...     parse_sweep_config(text, source="s.yaml")
        ... except SweepConfigError as err:
        ...     print(err.key, err.line)
        defenses[0].accountant 1
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
    grids = tuple(_check_defense(doc, e, i) for i, e in enumerate(raw_defenses))
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
