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
    membership:                    # MembershipAudit's; `membership: null` disables it
      attack: loss                 # any name of lightning_privacy.membership (no reference models)
      num_samples: 200             # members (training data) and non-members (validation data)
      every_n_epochs: 1
    backend: local                                    # or ray
    workers: 1

What a defense, the audit, the leakage monitor and the membership audit accept is read from the
components (:mod:`lightning_privacy.sweep.components`), and every one of them is built once while
the file is validated, so their own checks report a bad value at its line.

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
from lightning_privacy.membership import MEMBERSHIP_ATTACKS
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
    membership_arguments,
    membership_callback,
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
    "membership": {
        "attack": "loss",
        "num_samples": 200,
        "every_n_epochs": 1,
        "log_roc": False,
    },
}
#: The observer sections, each one disabled by ``null``.
OBSERVER_SECTIONS = ("audit", "leakage", "membership")
_TOP_LEVEL = ("name", "defenses", "backend", "workers", *_SECTIONS)
T = TypeVar("T")
#: Keys of a ``defenses:`` entry that are not the component's arguments.
_ENTRY_KEYS = ("name", "strengths", "param", "overrides")
#: The seed the defenses are built with during validation (``training.seed`` is checked apart).
_VALIDATION_SEED = 0
#: Sections a ``defenses:`` entry may override for its own trials (``overrides:``).
OVERRIDABLE_SECTIONS = ("data", "model", "training")


class SweepConfigError(ValueError):
    """A sweep configuration problem, naming the file, line and key -- or all of a file's.

    Attributes:
        key: Dotted path of the offending key, e.g. ``defenses[1].strengths[0]`` (the first
            problem's when there are several).
        line: 1-based line in the file, when known.
        errors: Every problem, each a ``SweepConfigError`` of its own (``(self,)`` for one).

    Example:
        >>> str(SweepConfigError("Bad.", key="workers", line=3, source="s.yaml"))
        's.yaml, line 3, key `workers`: Bad.'
        >>> both = SweepConfigError.combine([SweepConfigError("A.", key="a"),
        ...                                  SweepConfigError("B.", key="b")])
        >>> both.key, len(both.errors), str(both).splitlines()[1]
        ('a', 2, '<string>, key `b`: B.')
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
        self.errors: tuple[SweepConfigError, ...] = (self,)

    @classmethod
    def combine(cls, errors: list[SweepConfigError]) -> SweepConfigError:
        """One error reporting every problem of ``errors`` (one line each), in order."""
        items = [item for error in errors for item in error.errors]
        items.sort(key=lambda e: (e.line is None, e.line or 0))  # in file order
        if len(items) == 1:
            return items[0]
        combined = cls.__new__(cls)
        ValueError.__init__(combined, "\n".join(str(item) for item in items))
        combined.key, combined.line, combined.source = items[0].key, items[0].line, items[0].source
        combined.errors = tuple(items)
        return combined


class _Errors:
    """Collects the problems of independent checks, so that a file reports all of them."""

    def __init__(self) -> None:
        self.items: list[SweepConfigError] = []

    def run(self, check: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``check(*args, **kwargs)``, or ``None`` with its problem recorded."""
        try:
            return check(*args, **kwargs)
        except SweepConfigError as err:
            self.items.extend(err.errors)
            return None

    def raise_any(self) -> None:
        """Raise every problem recorded, as one :class:`SweepConfigError`."""
        if self.items:
            raise SweepConfigError.combine(self.items)


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
        settings: The ``data``/``model``/``training``/``audit``/``leakage``/``membership``
            sections the trial
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
    #: The entry's position in the file's ``defenses:`` (``-1``: its position in the grid).
    index: int = field(default=-1, compare=False, repr=False)


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
        for _, _, spec in self.trial_entries():
            seen.setdefault(spec.trial_id, spec)
        return list(seen.values())

    def trial_entries(self) -> list[tuple[int, int, TrialSpec]]:
        """``(entry index in defenses:, strength index, trial)`` for every point of the grid.

        Example:
            >>> config = parse_sweep_config("defenses: [{name: low_rank, strengths: [1, 2]}]")
            >>> [(i, j, t.label) for i, j, t in config.trial_entries()]
            [(0, 0, 'low_rank=1'), (0, 1, 'low_rank=2')]
        """
        entries = []
        for position, grid in enumerate(self.defenses):
            i = grid.index if grid.index >= 0 else position
            settings = {
                k: (dict(v) if isinstance(v, Mapping) else v) for k, v in self.settings.items()
            }
            for section, values in grid.overrides.items():
                settings[section] = {**settings[section], **values}
            overrides = {k: dict(v) for k, v in grid.overrides.items()}
            for j, strength in enumerate(grid.strengths):
                spec = TrialSpec(grid.name, strength, dict(grid.options), settings, overrides)
                entries.append((i, j, spec))
        return entries


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
    """Build the entry's component at every strength, so its own checks run before training.

    A component stops at its first bad argument; it is built again without that option until
    it builds, so every bad option of the entry is reported.
    """
    allowed = defense_options(name)
    errors = _Errors()
    if allowed is not None:
        errors.run(_check_option_names, doc, name, options, allowed, base)
    remaining = {k: v for k, v in options.items() if allowed is None or k in allowed}
    keys = {option: f"{base}.{option}" for option in options}
    for i, strength in enumerate(strengths):
        located = {**keys, str(strength_parameter(name)): f"{base}.strengths[{i}]"}
        for _ in range(len(options) + 1):
            build = partial(
                defense_callback, name, strength, dict(remaining), seed=_VALIDATION_SEED
            )
            try:
                _build(doc, build, what=name, keys=located, fallback=base)
                break
            except SweepConfigError as err:
                errors.items.append(err)
                option = next((o for o, k in keys.items() if k == err.key and o in remaining), None)
                if option is None:
                    break
                del remaining[option]  # look for the entry's next problem without this option
    errors.raise_any()


def _check_option_names(
    doc: _Located, name: str, options: Mapping[str, Any], allowed: tuple[str, ...], base: str
) -> None:
    """Unknown option keys, with the closest allowed one; the strength goes in ``strengths``."""
    strength = str(strength_parameter(name))
    errors = _Errors()
    for key in options:
        if key not in allowed:
            errors.run(_unknown_option, doc, name, key, allowed, strength, base)
    errors.raise_any()


def _unknown_option(
    doc: _Located, name: str, key: str, allowed: tuple[str, ...], strength: str, base: str
) -> None:
    """Raise for one unknown key of a ``defenses:`` entry."""
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
    """One ``defenses:`` entry; every problem of its overrides, strengths and options."""
    base = f"defenses[{index}]"
    entry = _check_mapping(doc, entry, base)
    name = _check_defense_name(doc, entry, base)
    options = {k: v for k, v in entry.items() if k not in _ENTRY_KEYS}
    errors = _Errors()
    overrides = errors.run(_check_overrides, doc, entry.get("overrides", {}), f"{base}.overrides")
    if name == "none":
        if "strengths" in entry:
            errors.run(
                _fail, doc.error(f"{base}.strengths", "The defense 'none' takes no strengths.")
            )
        for option in options:
            errors.run(_fail, doc.error(f"{base}.{option}", "The defense 'none' takes no options."))
        errors.raise_any()
        return DefenseGrid(name, (None,), {}, overrides or {}, index)
    strengths = errors.run(_check_strengths, doc, entry, name, base)
    # with bad strengths the options are still checked by name (the component needs a strength)
    errors.run(_check_defense_options, doc, name, strengths or (), options, base)
    errors.raise_any()
    assert strengths is not None and overrides is not None  # no problem was found
    return DefenseGrid(name, strengths, options, overrides, index)


def _fail(error: SweepConfigError) -> None:
    """Raise ``error`` (for :meth:`_Errors.run`)."""
    raise error


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
    errors = _Errors()
    for section in OVERRIDABLE_SECTIONS:
        for name, value in (sections.get(section) or {}).items():
            errors.run(_check_core_value, doc, f"{section}.{name}", name, value, prefix)
    errors.raise_any()


def _check_core_value(doc: _Located, key: str, name: str, value: Any, prefix: str) -> None:
    """One ``data``/``model``/``training`` value (``key`` is ``section.name``)."""
    if key in _CHOICES and value not in _CHOICES[key]:
        allowed = ", ".join(repr(c) for c in _CHOICES[key])
        raise doc.error(
            prefix + key, f"Expected `{key}` to be one of {allowed}, but got {describe(value)}."
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
    """A shared section's keys: its defaults, and for an observer the callback's arguments."""
    derived = {
        "audit": audit_arguments,
        "leakage": leakage_arguments,
        "membership": membership_arguments,
    }.get(section)
    return tuple(dict.fromkeys([*_SECTIONS[section], *(derived() if derived else ())]))


def _check_section(doc: _Located, data: dict[str, Any], section: str) -> dict[str, Any] | None:
    """One shared section with its defaults applied (``None``: that observer is off)."""
    raw = data.get(section, {})
    if raw is None and section in OBSERVER_SECTIONS:
        return None
    raw = _check_mapping(doc, raw if raw is not None else {}, section)
    errors = _Errors()
    for key in raw:
        errors.run(_unknown_keys, doc, {key: None}, _allowed_keys(section), f"{section}.")
    errors.raise_any()
    return {**_SECTIONS[section], **raw}


def _check_settings(doc: _Located, data: dict[str, Any], errors: _Errors) -> dict[str, Any]:
    """The shared sections, every problem recorded in ``errors``; a bad value is its default."""
    first = len(errors.items)
    settings: dict[str, Any] = {}
    for section, defaults in _SECTIONS.items():
        checked = errors.run(_check_section, doc, data, section)
        if checked is not None or data.get(section, {}) is None:
            settings[section] = checked
        else:  # a broken section: its defaults, so the other sections are still checked
            settings[section] = dict(defaults)
    errors.run(_check_core_values, doc, settings, "")
    seed = settings["training"]["seed"]
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else 0
    if settings["audit"] is not None:
        errors.run(_check_audit, doc, settings["audit"], seed)
    if settings["leakage"] is not None:
        leakage = settings["leakage"]
        build = partial(leakage_callback, leakage, seed=seed)
        keys = {name: f"leakage.{name}" for name in leakage}
        errors.run(_build, doc, build, what="LeakageMonitor", keys=keys, fallback="leakage")
    if settings["membership"] is not None:
        errors.run(_check_membership, doc, settings["membership"], seed)
    return _with_defaults(settings, [e.key for e in errors.items[first:]])


def _with_defaults(settings: dict[str, Any], keys: list[str | None]) -> dict[str, Any]:
    """``settings`` with the values at ``keys`` (``section.name``) put back to their defaults."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in settings.items()}
    for key in keys:
        section, _, name = (key or "").partition(".")
        name = name.split(".")[0]
        if section in OBSERVER_SECTIONS and not name:
            out[section] = None  # a section-level problem: the trials run without it
        elif isinstance(out.get(section), dict) and name in out[section]:
            if name in _SECTIONS[section]:
                out[section][name] = _SECTIONS[section][name]
            else:
                del out[section][name]
    return out


def _check_audit(doc: _Located, audit: dict[str, Any], seed: int) -> None:
    """The attack's name, its options (the attack's own checks), then ``InversionAudit``'s."""
    attack, options = audit["attack"], _check_mapping(doc, audit["options"], "audit.options")
    _build(doc, partial(ATTACKS.get, attack), what="audit", keys={}, fallback="audit.attack")
    build_attack = partial(create_attack, attack, **options)
    option_keys = {option: f"audit.options.{option}" for option in options}
    _build(doc, build_attack, what=str(attack), keys=option_keys, fallback="audit.options")
    build = partial(audit_callback, audit, seed=seed)
    keys = {name: f"audit.{name}" for name in audit if name not in ATTACK_KEYS}
    _build(doc, build, what="InversionAudit", keys=keys, fallback="audit")


def _check_membership(doc: _Located, membership: dict[str, Any], seed: int) -> None:
    """The attack's name, then ``MembershipAudit``'s checks.

    A reference-model attack is refused at ``membership.attack``: a sweep trains no reference
    models (``lightning-privacy audit membership`` does).
    """
    lookup = partial(MEMBERSHIP_ATTACKS.get, str(membership.get("attack")))
    _build(doc, lookup, what="membership", keys={}, fallback="membership.attack")
    build = partial(membership_callback, membership, seed=seed)
    keys = {name: f"membership.{name}" for name in membership}
    _build(doc, build, what="MembershipAudit", keys=keys, fallback="membership.attack")


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
    r"""Validate a sweep configuration given as YAML text.

    Args:
        text: The YAML document.
        source: File name used in messages.
        backend: Overrides the file's ``backend`` (the command line's ``--backend``).

    Raises:
        SweepConfigError: Reporting every problem of the file (``errors``), each naming its line
            and key.

    Example:
        >>> text = "defenses: [{name: dpsgd, strengths: [1.0], accountant: foo}]\nworkers: 0"
        >>> try:
        ...     parse_sweep_config(text, source="s.yaml")
        ... except SweepConfigError as err:
        ...     print([(e.key, e.line) for e in err.errors])
        [('defenses[0].accountant', 1), ('workers', 2)]
    """
    _, config, errors, _ = parse_located(text, source=source, backend=backend)
    if config is None:
        raise SweepConfigError.combine(errors)
    return config


def _check_grids(doc: _Located, data: dict[str, Any], errors: _Errors) -> tuple[DefenseGrid, ...]:
    """The valid ``defenses:`` entries; every problem of every entry recorded in ``errors``."""
    try:
        return _grids(doc, data, errors)
    except SweepConfigError as err:
        errors.items.extend(err.errors)
        return ()


def _grids(doc: _Located, data: dict[str, Any], errors: _Errors) -> tuple[DefenseGrid, ...]:
    if "defenses" not in data:
        raise SweepConfigError(
            "Missing required key `defenses`: a list of entries such as "
            "`- {name: gaussian_noise, strengths: [0.01, 0.1]}`.",
            key="defenses",
            source=doc.source,
        )
    raw_defenses = data["defenses"]
    if not isinstance(raw_defenses, list) or not raw_defenses:
        raise doc.error(
            "defenses",
            f"Expected `defenses` to be a non-empty list, but got {describe(raw_defenses)}.",
        )
    grids = [errors.run(_check_defense, doc, e, i) for i, e in enumerate(raw_defenses)]
    return tuple(g for g in grids if g is not None)


def parse_located(
    text: str, *, source: str = "<string>", backend: str | None = None
) -> tuple[_Located, SweepConfig | None, list[SweepConfigError], SweepConfig]:
    """Validate YAML text and keep the located document (for checks that build the trials).

    Returns:
        The document (keys and their lines), the configuration (``None`` if anything is wrong),
        every problem found, and the part of the file that is valid (the valid entries, bad
        settings at their defaults) so that its trials can still be checked.

    Raises:
        SweepConfigError: If the text is not YAML or not a mapping (nothing else can be checked).
    """
    doc = _Located(text, source)
    data = doc.data
    if not isinstance(data, dict):
        raise SweepConfigError("Expected a mapping at the top level.", line=1, source=source)
    errors = _Errors()
    for key in data:
        errors.run(_unknown_keys, doc, {key: None}, _TOP_LEVEL, "")
    grids = _check_grids(doc, data, errors)
    settings = _check_settings(doc, data, errors)
    workers = errors.run(
        _check_number,
        doc,
        "workers",
        data.get("workers", 1),
        name="workers",
        integer=True,
        positive=True,
    )
    if backend is None:
        chosen = errors.run(check_backend, data.get("backend", "local"), doc=doc)
    else:
        chosen = errors.run(check_backend, backend, key="--backend", source="<command line>")
    name = str(data.get("name", "sweep"))
    valid = SweepConfig(grids, settings, str(chosen or "local"), int(workers or 1), name)
    if errors.items:
        return doc, None, errors.items, valid
    return doc, valid, [], valid


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
