r"""A sweep file validated completely before anything runs: static checks, then a dry run.

:func:`~lightning_privacy.sweep.config.parse_sweep_config` checks every key and builds every
component once. Some problems only show when a trial's model, data and Trainer exist -- a
DP-SGD ``grad_sample_mode: ghost`` with a mean loss, ``model.init: unifrom``, an image size the
model refuses, ``leakage.estimator: expected`` with pruning, a text attack on an image model,
more ``audit.num_samples`` than the held-out batch holds. :func:`check_sweep_text` therefore
also *dry-runs* every trial (:func:`~lightning_privacy.sweep.trial.dry_run_trial`: the Trainer's
checks before the first step, no training) and reports every problem of the file at once, each
at the line and key it concerns (the key of the argument the message names, in the trial's
entry, its overrides or the shared sections). ``lightning-privacy sweep`` runs it before it
creates the run directory.

Example:
    >>> text = '''
    ... defenses:
    ...   - name: none
    ...   - name: magnitude_pruning
    ...     strengths: [0.5]
    ... model: {init: unifrom}
    ... leakage: {estimator: expected}
    ... audit: null
    ... '''
    >>> try:
    ...     check_sweep_text(text, source="s.yaml")
    ... except SweepConfigError as err:
    ...     for e in err.errors:
    ...         print(e.key, e.line)
    model.init 6
    leakage.estimator 7
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_privacy.sweep.config import (
    OBSERVER_SECTIONS,
    OVERRIDABLE_SECTIONS,
    SweepConfig,
    SweepConfigError,
    TrialSpec,
    _with_defaults,
    parse_located,
)
from lightning_privacy.sweep.trial import dry_run_trial

__all__ = ["check_sweep_file", "check_sweep_text", "dry_run_problems"]

_ARGUMENT_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
#: Dry runs of one trial at most: after each problem the setting is put back and it runs again.
_MAX_RUNS = 8
#: The shared section a callback's message concerns, by the name it starts with.
_OWNERS = {"InversionAudit": "audit", "LeakageMonitor": "leakage", "MembershipAudit": "membership"}


def _named_arguments(message: str) -> list[str]:
    """The arguments a message names: backquoted ones first, then ``name=value`` ones."""
    quoted = [p for p in message.split("`")[1::2] if p and all(c in _ARGUMENT_CHARS for c in p)]
    return quoted + re.findall(r"\b([A-Za-z_]\w*)=", message)


def _candidate_keys(
    config: SweepConfig, entry: int, strength: int, spec: TrialSpec
) -> dict[str, list[str]]:
    """``{argument: [keys in the file]}`` for one trial, most specific first."""
    keys: dict[str, list[str]] = {}
    base = f"defenses[{entry}]"
    for option in spec.options:
        keys.setdefault(option, []).append(f"{base}.{option}")
    for section, values in spec.overrides.items():
        for name in values:
            keys.setdefault(name, []).append(f"{base}.overrides.{section}.{name}")
    keys.setdefault("strength", []).append(f"{base}.strengths[{strength}]")
    for section in (*OVERRIDABLE_SECTIONS, *OBSERVER_SECTIONS):
        for name in spec.settings.get(section) or {}:
            keys.setdefault(name, []).append(f"{section}.{name}")
    return keys


def _locate(message: str, keys: Mapping[str, list[str]], entry: int) -> str:
    """The key of the file a dry-run error concerns."""
    owner = next((s for name, s in _OWNERS.items() if message.startswith(name)), None)
    for argument in _named_arguments(message):
        found = keys.get(argument, [])
        preferred = [k for k in found if owner is not None and k.startswith(f"{owner}.")]
        if preferred or found:
            return (preferred or found)[0]
    if owner == "audit" and "attack" in message.lower():
        return "audit.attack"
    if owner is not None:
        return owner
    return f"defenses[{entry}]"


def _reverted(spec: TrialSpec, key: str, config: SweepConfig, entry: int) -> TrialSpec | None:
    """``spec`` with the setting at ``key`` put back (to the shared value or the default).

    ``None`` when the key is no setting that can be put back (a strength, the entry itself).
    """
    base = f"defenses[{entry}]."
    options, settings = dict(spec.options), dict(spec.settings)
    if key.startswith(base + "overrides."):
        section, _, name = key[len(base + "overrides.") :].partition(".")
        shared = config.settings.get(section) or {}
        settings[section] = {**settings[section], name: shared.get(name)}
    elif key.startswith(base) and key[len(base) :] in options:
        del options[key[len(base) :]]
    elif not key.startswith("defenses["):
        settings = _with_defaults(settings, [key])
    if options == spec.options and settings == spec.settings:
        return None
    return TrialSpec(spec.defense, spec.strength, options, settings, spec.overrides)


def dry_run_problems(doc: Any, config: SweepConfig) -> list[SweepConfigError]:
    """Dry-run every trial of ``config``; one located error per distinct problem.

    After a problem the setting it concerns is put back (to the shared value or the default) and
    the trial runs again, so a trial reports all of its problems, not only the first; a bad
    shared setting is put back for the later trials too and reported once.

    Args:
        doc: The located document :func:`~lightning_privacy.sweep.config.parse_located` returned.
        config: The configuration to dry-run (statically valid).
    """
    found: dict[tuple[str, str], str] = {}
    shared: list[str] = []  # shared settings found bad, put back for every later trial
    for entry, strength, spec in config.trial_entries():
        for key in shared:
            spec = _reverted(spec, key, config, entry) or spec
        for _ in range(_MAX_RUNS):
            try:
                dry_run_trial(spec)
                break
            except Exception as err:  # every problem of a trial, whatever raised it, is reported
                message = str(err).strip() or type(err).__name__
                key = _locate(message, _candidate_keys(config, entry, strength, spec), entry)
                found.setdefault((key, message), spec.label)
                fixed = _reverted(spec, key, config, entry)
                if fixed is None:
                    break
                if not key.startswith("defenses["):
                    shared.append(key)
                spec = fixed
    return [
        doc.error(key, f"{message} (found by a dry run of trial {label})")
        for (key, message), label in found.items()
    ]


def check_sweep_text(
    text: str, *, source: str = "<string>", backend: str | None = None
) -> SweepConfig:
    """Validate a sweep configuration completely: every key, then a dry run of every trial.

    Raises:
        SweepConfigError: Reporting every problem of the file (``errors``) with line and key.
            The trials of the valid entries are dry-run even when other keys are wrong (with the
            wrong settings at their defaults), so one run of the check finds everything.
    """
    doc, config, errors, valid = parse_located(text, source=source, backend=backend)
    problems = [*errors, *dry_run_problems(doc, valid)]
    if problems or config is None:
        raise SweepConfigError.combine(problems)
    return config


def check_sweep_file(path: str | Path, *, backend: str | None = None) -> SweepConfig:
    r""":func:`check_sweep_text` of a file.

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "s.yaml")
        ...     _ = open(p, "w").write("defenses: [{name: none}]\naudit: null\nleakage: null\n")
        ...     check_sweep_file(p).backend
        'local'
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SweepConfigError(
            f"Cannot read the sweep configuration: {err.strerror}.", source=str(path)
        ) from None
    return check_sweep_text(text, source=str(path), backend=backend)
