"""The results of a sweep: one :class:`TrialResult` per trial and the files of a run directory.

A run directory holds ``trials/<trial_id>/result.json`` (one per finished trial),
``results.csv`` (:data:`RESULT_COLUMNS`, one row per trial of the grid), ``sweep.json`` (the
validated configuration, with the trial ids of its grid) and ``report.html``. Every one of them
is written by :func:`write_atomic`, so a reader (a resumed sweep, the report) never sees a
partial file. This module is all the report and the command line need to read a run; it imports
nothing that runs trials.

Every ``result.json`` carries :data:`SCHEMA_VERSION` and is validated when read
(:func:`read_result`): a file that is not a complete result (truncated, not an object, keys
missing, written by a newer version, in another trial's folder) raises :class:`InvalidResultError`
naming the file and the reason; a resumed sweep moves it aside (:func:`set_aside`) and trains the
trial again, and the report names it instead of dropping it. :func:`scan_run` also tells the
trials of the current configuration (``sweep.json``'s ``trials``) from those an older
configuration left in ``trials/``.

Example:
    >>> import tempfile
    >>> from lightning_privacy.sweep.config import TrialSpec
    >>> spec = TrialSpec("gaussian_noise", 0.1)
    >>> result = TrialResult.finished(spec, val_acc=0.8, seconds=1.5)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = write_result(d, result)
    ...     load_finished(d, spec) == result, load_results(d)[0]["val_acc"]
    (True, 0.8)
    >>> TrialResult.failed(spec, "ValueError: boom").status
    'failed: ValueError: boom'
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lightning_privacy.sweep.components import NO_DEFENSE
from lightning_privacy.sweep.config import TrialSpec, format_overrides

RESULT_FILE = "result.json"
RESULTS_CSV = "results.csv"
SWEEP_FILE = "sweep.json"
TRIALS_DIR = "trials"
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
    "mia_auc",
    "mia_tpr_at_1pct_fpr",
    "audited_epsilon",
    "seconds",
    "status",
)
#: What the ε column says for a defense that ran but gives no formal (ε, δ) guarantee.
NO_FORMAL_DP = "no formal DP"
#: The status of a trial that trained to the end.
STATUS_OK = "ok"
#: The version of ``result.json`` this library writes (files without one are version 0).
SCHEMA_VERSION = 1
#: What a bad ``result.json`` is renamed to when a sweep sets it aside.
INVALID_FILE = "result.invalid.json"
#: Keys every ``result.json`` holds, whatever its version.
_REQUIRED_KEYS = ("trial_id", "label", "defense", "status")
_NUMBERS = tuple(c for c in RESULT_COLUMNS if c not in ("trial_id", "defense", "seconds", "status"))


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write ``content`` so that a reader never sees a partial file.

    The content goes to a temporary file in the same directory (named after this process, so
    concurrent writers do not collide), which then replaces ``path`` in one ``os.replace``.
    Text is written as UTF-8 without newline translation.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = write_atomic(os.path.join(d, "a.txt"), "one")
        ...     p.read_text(), os.listdir(d)
        ('one', ['a.txt'])
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(content)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON with :func:`write_atomic` (``inf`` as ``Infinity``, like Python).

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = write_json_atomic(os.path.join(d, "a.json"), {"eps": float("inf")})
        ...     path.read_text().split()
        ['{', '"eps":', 'Infinity', '}']
    """
    return write_atomic(path, json.dumps(data, indent=1, default=str))


@dataclass(frozen=True, kw_only=True)
class TrialResult:
    """What one trial measured: the content of its ``result.json``.

    Attributes:
        trial_id: Directory name of the trial (:attr:`TrialSpec.trial_id`).
        fingerprint: The spec's fingerprint (``None`` for a failed trial); a rerun skips a
            finished trial only when it is unchanged.
        label: Human-readable name, e.g. ``gaussian_noise=0.01``.
        defense: ``"none"``, ``"dpsgd"`` or a registered defense name.
        strength: The defense's strength, ``None`` for ``"none"``.
        overrides: The settings the trial overrides, ``"model.lr=0.03, data.batch_size=128"``.
        val_acc: Validation accuracy at the end of training.
        epsilon: The formal ε (``inf`` without a defense, ``None`` without a formal guarantee).
        attack_psnr: PSNR of the audit's reconstruction (dB).
        attack_ssim: SSIM of the audit's reconstruction.
        predicted_psnr: The I²F predicted PSNR (dB).
        mia_auc: The membership audit's AUC (0.5: members and non-members look alike).
        mia_tpr_at_1pct_fpr: Its true-positive rate at 1 % false positives.
        audited_epsilon: The ε its scores prove (one-sided Clopper-Pearson, 95 %): an empirical
            lower bound to read beside ``epsilon``.
        seconds: Training time, audits included.
        status: ``"ok"``, or ``"failed: <reason>"``.
        warnings: The first line of every distinct warning raised during training.
        threat_model: What the simulated attacker saw, as the callbacks recorded it.
        history: Every logged scalar, ``{key: [[step, value], ...]}``.
        images: The trial's image files, relative to its directory.
        spec: The :class:`TrialSpec` as a dict (``None`` for a failed trial).
        schema_version: The ``result.json`` format (:data:`SCHEMA_VERSION` when written).

    Example:
        >>> result = TrialResult(trial_id="none-1", label="none", defense="none", epsilon=None)
        >>> result.ok, result.guarantee
        (True, inf)
        >>> TrialResult.from_dict(result.to_dict()) == result
        True
    """

    trial_id: str
    fingerprint: str | None = None
    label: str
    defense: str
    strength: float | None = None
    overrides: str = ""
    val_acc: float | None = None
    epsilon: float | None = None
    attack_psnr: float | None = None
    attack_ssim: float | None = None
    predicted_psnr: float | None = None
    mia_auc: float | None = None
    mia_tpr_at_1pct_fpr: float | None = None
    audited_epsilon: float | None = None
    seconds: float | None = None
    status: str = STATUS_OK
    warnings: tuple[str, ...] = ()
    threat_model: Mapping[str, Any] = field(default_factory=dict)
    history: Mapping[str, Sequence[Sequence[float]]] = field(default_factory=dict)
    images: tuple[str, ...] = ()
    spec: Mapping[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def finished(cls, spec: TrialSpec, **measured: Any) -> TrialResult:
        """The result of ``spec`` after training: its identity plus the ``measured`` fields.

        Example:
            >>> spec = TrialSpec("none", None)
            >>> result = TrialResult.finished(spec, val_acc=0.9)
            >>> result.fingerprint == spec.fingerprint, result.label, result.val_acc
            (True, 'none', 0.9)
        """
        return cls(**_identity(spec), fingerprint=spec.fingerprint, spec=spec.to_dict(), **measured)

    @classmethod
    def failed(cls, spec: TrialSpec, reason: str) -> TrialResult:
        """The result of a trial that raised: nothing measured, ``status="failed: <reason>"``.

        Example:
            >>> TrialResult.failed(TrialSpec("none", None), "no result").ok
            False
        """
        return cls(**_identity(spec), status=f"failed: {reason}")

    @property
    def ok(self) -> bool:
        """Whether the trial trained to the end (its measurements are meaningful)."""
        return self.status == STATUS_OK

    @property
    def guarantee(self) -> float | str | None:
        """What the ε column shows: ε (``inf`` without a defense), else :data:`NO_FORMAL_DP`.

        ``None`` for a failed trial.

        Example:
            >>> TrialResult(trial_id="g", label="g", defense="gaussian_noise").guarantee
            'no formal DP'
        """
        if not self.ok:
            return self.epsilon
        if self.defense == NO_DEFENSE:
            return math.inf if self.epsilon is None else self.epsilon
        return NO_FORMAL_DP if self.epsilon is None else self.epsilon

    def to_dict(self) -> dict[str, Any]:
        """The ``result.json`` content: plain JSON types (lists, dicts, floats, ``None``)."""
        return json.loads(json.dumps(asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, spec: TrialSpec | None = None) -> TrialResult:
        """Read a ``result.json`` dict, of this version or an older one.

        Keys that are not fields are ignored (older files have ``missing``); an ``overrides``
        mapping is written as text; a dict without ``schema_version`` is version 0. Identity
        fields ``data`` lacks (the partial dict of a custom trial function) are taken from
        ``spec`` when given, else ``label`` is the ``trial_id``. This reads leniently; files are
        validated by :func:`read_result`.

        Raises:
            ValueError: If there is no ``trial_id`` (and no ``spec``).

        Example:
            >>> old = {"trial_id": "none-1", "label": "none", "defense": "none", "missing": []}
            >>> TrialResult.from_dict(old).status
            'ok'
        """
        known = {f.name for f in fields(cls)}
        values = {} if spec is None else _identity(spec)
        values.update({k: v for k, v in data.items() if k in known})
        if "trial_id" not in values:
            raise ValueError(
                f"Expected a trial result with a `trial_id`, but got the keys {sorted(data)}."
            )
        values.setdefault("label", values["trial_id"])
        values.setdefault("defense", "")
        values.setdefault("schema_version", 0)  # written before versions existed
        overrides = values.get("overrides")
        if isinstance(overrides, Mapping):
            values["overrides"] = format_overrides(overrides)
        else:
            values["overrides"] = str(overrides or "")
        for name in ("warnings", "images"):
            values[name] = tuple(values.get(name) or ())
        for name in ("threat_model", "history"):
            values[name] = dict(values.get(name) or {})
        return cls(**values)


def _identity(spec: TrialSpec) -> dict[str, Any]:
    """The fields of a result that the spec alone determines."""
    return {
        "trial_id": spec.trial_id,
        "label": spec.label,
        "defense": spec.defense,
        "strength": spec.strength,
        "overrides": spec.overrides_text,
    }


def as_result(result: TrialResult | Mapping[str, Any]) -> TrialResult:
    """``result`` itself, or a ``result.json`` dict read with :meth:`TrialResult.from_dict`.

    Example:
        >>> as_result({"trial_id": "a", "defense": "none"}).label
        'a'
    """
    return result if isinstance(result, TrialResult) else TrialResult.from_dict(result)


def trial_dir(out_dir: str | Path, trial_id: str) -> Path:
    """The directory of one trial in a run directory.

    Example:
        >>> trial_dir("runs/x", "none-1").as_posix()
        'runs/x/trials/none-1'
    """
    return Path(out_dir) / TRIALS_DIR / trial_id


def write_result(out_dir: str | Path, result: TrialResult) -> Path:
    """Store ``result`` as its trial's ``result.json`` (the trial counts as finished from then).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = write_result(d, TrialResult(trial_id="a", label="a", defense="none"))
        ...     path.relative_to(d).as_posix()
        'trials/a/result.json'
    """
    directory = trial_dir(out_dir, result.trial_id)
    directory.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(directory / RESULT_FILE, result.to_dict())


class InvalidResultError(ValueError):
    """A ``result.json`` that is not a complete result of this library.

    Attributes:
        path: The file.
        reason: What is wrong with it.

    Example:
        >>> str(InvalidResultError(Path("trials/a/result.json"), "not valid JSON"))
        'trials/a/result.json: not valid JSON'
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _problems(data: Mapping[str, Any], folder: str) -> list[str]:
    """What keeps ``data`` (a parsed ``trials/<folder>/result.json``) from being a result."""
    version = data.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        return [f"its schema_version {version!r} is not a version number"]
    if version > SCHEMA_VERSION:
        return [
            f"it was written by a newer lightning-privacy (schema version {version} > "
            f"{SCHEMA_VERSION}); upgrade to read it"
        ]
    required = [*_REQUIRED_KEYS]
    if data.get("status") == STATUS_OK:
        required += ["fingerprint"] + (["spec"] if version >= 1 else [])
    missing = [key for key in required if key not in data]
    problems = [f"keys missing: {', '.join(missing)}"] if missing else []
    if "trial_id" in data and data["trial_id"] != folder:
        problems.append(f"its trial_id {data['trial_id']!r} is not its folder's {folder!r}")
    if "status" in data and not isinstance(data["status"], str):
        problems.append(f"its status is {describe_json(data['status'])}, not text")
    for key in _NUMBERS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"its {key} is {describe_json(value)}, not a number")
    return problems


def describe_json(value: Any) -> str:
    """A JSON value's kind for a message (``a list``, ``the text 'x'``, ...).

    Example:
        >>> describe_json([]), describe_json("x"), describe_json(None)
        ('a list', "the text 'x'", 'null')
    """
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the text {value!r}"
    kinds = {list: "a list", dict: "an object", bool: "a boolean"}
    return kinds.get(type(value), f"the number {value!r}")


def read_result(path: str | Path) -> TrialResult | None:
    """The result stored at ``path`` (``None`` if there is no file), validated.

    Raises:
        InvalidResultError: If the file is unreadable, not JSON (e.g. truncated), not an
            object, misses keys of its schema version, has ill-typed values, lies in another
            trial's folder or was written by a newer version.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = write_result(d, TrialResult(trial_id="a", label="a", defense="none"))
        ...     ok = read_result(path).label
        ...     _ = path.write_text('{"trial_id": "a", "fingerp')
        ...     try:
        ...         read_result(path)
        ...     except InvalidResultError as err:
        ...         bad = err.reason
        >>> ok, bad
        ('a', 'not valid JSON (truncated?): Unterminated string starting at (line 1, column 19)')
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidResultError(path, f"unreadable ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        where = f"{err.msg} (line {err.lineno}, column {err.colno})"
        raise InvalidResultError(path, f"not valid JSON (truncated?): {where}") from None
    if not isinstance(data, Mapping):
        raise InvalidResultError(path, f"expected a JSON object, but got {describe_json(data)}")
    problems = _problems(data, path.parent.name)
    if problems:
        raise InvalidResultError(path, "; ".join(problems))
    try:
        return TrialResult.from_dict(data)
    except (TypeError, ValueError) as err:
        raise InvalidResultError(path, str(err)) from None


def check_finished(out_dir: str | Path, spec: TrialSpec) -> TrialResult | None:
    """The stored result of ``spec`` if it finished with the same fingerprint, else ``None``.

    Raises:
        InvalidResultError: If its ``result.json`` exists but is not a valid result.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     check_finished(d, TrialSpec("none", None)) is None
        True
    """
    result = read_result(trial_dir(out_dir, spec.trial_id) / RESULT_FILE)
    return result if result is not None and result.fingerprint == spec.fingerprint else None


def load_finished(out_dir: str | Path, spec: TrialSpec) -> TrialResult | None:
    """:func:`check_finished`, with ``None`` for an invalid file too (the trial is unfinished).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     load_finished(d, TrialSpec("none", None)) is None
        True
    """
    try:
        return check_finished(out_dir, spec)
    except InvalidResultError:
        return None


def set_aside(path: str | Path) -> Path:
    """Rename a bad ``result.json`` to :data:`INVALID_FILE` beside it (kept for inspection).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     bad = Path(d) / "result.json"
        ...     _ = bad.write_text("[]")
        ...     set_aside(bad).name, bad.exists()
        ('result.invalid.json', False)
    """
    path = Path(path)
    target = path.with_name(INVALID_FILE)
    os.replace(path, target)
    return target


@dataclass(frozen=True)
class RunScan:
    """What a run directory's ``trials/*/result.json`` hold.

    Attributes:
        results: Valid results of the current configuration (all of them when ``sweep.json``
            lists no trials), in ``results.csv`` order.
        stale: Valid results of trials the current configuration does not have.
        invalid: The files that are not valid results.

    Example:
        >>> RunScan((), (), ()).results
        ()
    """

    results: tuple[TrialResult, ...]
    stale: tuple[TrialResult, ...]
    invalid: tuple[InvalidResultError, ...]


def scan_run(out_dir: str | Path) -> RunScan:
    """Read and validate every ``trials/*/result.json`` of a run directory.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = write_result(d, TrialResult(trial_id="a", label="a", defense="none"))
        ...     _ = write_result(d, TrialResult(trial_id="old", label="old", defense="none"))
        ...     _ = write_sweep_record(d, {"trials": ["a"]})
        ...     _ = (Path(d) / "trials" / "b").mkdir()
        ...     _ = (Path(d) / "trials" / "b" / "result.json").write_text("[]")
        ...     scan = scan_run(d)
        >>> [r.trial_id for r in scan.results], [r.trial_id for r in scan.stale]
        (['a'], ['old'])
        >>> scan.invalid[0].reason
        'expected a JSON object, but got a list'
    """
    out = Path(out_dir)
    found: dict[str, TrialResult] = {}
    invalid: list[InvalidResultError] = []
    for path in sorted(out.glob(f"{TRIALS_DIR}/*/{RESULT_FILE}")):
        try:
            result = read_result(path)
        except InvalidResultError as err:
            invalid.append(err)
            continue
        if result is not None:
            found[result.trial_id] = result
    order: list[str] = []
    if (out / RESULTS_CSV).is_file():
        order = [row["trial_id"] for row in read_results_csv(out / RESULTS_CSV)]
    ranked = [found[t] for t in order if t in found]
    ranked += [r for t, r in found.items() if t not in order]
    current = load_sweep_record(out).get("trials")
    if not isinstance(current, list):
        return RunScan(tuple(ranked), (), tuple(invalid))
    keep = set(map(str, current))
    return RunScan(
        tuple(r for r in ranked if r.trial_id in keep),
        tuple(r for r in ranked if r.trial_id not in keep),
        tuple(invalid),
    )


def load_trial_results(out_dir: str | Path, *, include_stale: bool = False) -> list[TrialResult]:
    """The valid ``trials/*/result.json`` of a run directory, in ``results.csv`` order.

    Results ``results.csv`` does not list (the sweep was interrupted) come last, by trial id.
    Only the trials of the current configuration (``sweep.json``'s ``trials``) unless
    ``include_stale``; invalid files are left out (:func:`scan_run` names them).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = write_result(d, TrialResult(trial_id="b", label="b", defense="none"))
        ...     _ = write_result(d, TrialResult(trial_id="a", label="a", defense="none"))
        ...     _ = write_results_csv([{"trial_id": "b"}, {"trial_id": "a"}], f"{d}/results.csv")
        ...     [r.trial_id for r in load_trial_results(d)]
        ['b', 'a']
    """
    scan = scan_run(out_dir)
    return [*scan.results, *(scan.stale if include_stale else ())]


def load_results(out_dir: str | Path) -> list[dict[str, Any]]:
    """:func:`load_trial_results` as ``result.json`` dicts.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     load_results(d)
        []
    """
    return [result.to_dict() for result in load_trial_results(out_dir)]


def write_results_csv(results: Iterable[TrialResult | Mapping[str, Any]], path: str | Path) -> Path:
    """Write the :data:`RESULT_COLUMNS` of every result (``None`` as an empty cell).

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = write_results_csv([{"trial_id": "a", "val_acc": 0.5}], os.path.join(d, "r.csv"))
        ...     p.read_text().splitlines()[1]
        'a,,,0.5,,,,,,,,,ok'
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(RESULT_COLUMNS)
    for result in results:
        row = as_result(result).to_dict()
        writer.writerow(["" if row[c] is None else row[c] for c in RESULT_COLUMNS])
    return write_atomic(path, buffer.getvalue())


def read_results_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``results.csv`` as dicts of strings.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = write_results_csv([{"trial_id": "a", "val_acc": 0.5}], os.path.join(d, "r.csv"))
        ...     read_results_csv(p)[0]["val_acc"]
        '0.5'
    """
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_sweep_record(out_dir: str | Path, record: Mapping[str, Any]) -> Path:
    """Store the validated configuration of a run (``sweep.json``: grid, settings, title).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = write_sweep_record(d, {"title": "t"})
        ...     load_sweep_record(d)
        {'title': 't'}
    """
    return write_json_atomic(Path(out_dir) / SWEEP_FILE, dict(record))


def load_sweep_record(out_dir: str | Path) -> dict[str, Any]:
    """The run's ``sweep.json`` (``{}`` when there is none or it is unreadable).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     load_sweep_record(d)
        {}
    """
    try:
        record = json.loads((Path(out_dir) / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
