"""What each part of a sweep configuration builds, read from the components themselves.

A ``defenses:`` entry names a registered gradient transform or ``dpsgd``. A transform's
``strength`` ClassVar names the argument its ``strengths`` are values of (integer-valued when the
dataclass field is an ``int``); DP-SGD's strength is the noise multiplier of
:class:`~lightning_privacy.callbacks.DPSGD`. The entry's other keys are the component's own
arguments, and the ``audit:`` / ``leakage:`` / ``membership:`` sections are those of
:class:`~lightning_privacy.callbacks.InversionAudit`,
:class:`~lightning_privacy.callbacks.LeakageMonitor` and
:class:`~lightning_privacy.callbacks.MembershipAudit`. Nothing here lists a component's arguments:
they come from its signature, so a new defense or option needs no sweep edit. The same builders
serve the validation (which builds every component once, so its own checks run before anything
is trained) and the trials.

Example:
    >>> strength_parameter("low_rank"), integer_strength("low_rank")
    ('rank', True)
    >>> strength_parameter("dpsgd"), "accountant" in defense_options("dpsgd")
    ('noise_multiplier', True)
    >>> defense_callback("magnitude_pruning", 0.9, {}, seed=0).transforms
    (MagnitudePruning(ratio=0.9, scope='per_tensor'),)
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import is_dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

from lightning.pytorch import Callback

from lightning_privacy.attacks import create_attack
from lightning_privacy.callbacks import (
    DPSGD,
    GradientDefense,
    InversionAudit,
    LeakageMonitor,
    MembershipAudit,
)
from lightning_privacy.defenses import DEFENSES, GradientTransform

#: The entry that trains without a defense.
NO_DEFENSE = "none"
#: The entry that trains with the :class:`~lightning_privacy.callbacks.DPSGD` callback.
DPSGD_DEFENSE = "dpsgd"
#: Defense names that are not gradient transforms.
SPECIAL_DEFENSES = (NO_DEFENSE, DPSGD_DEFENSE)
#: DP-SGD's strength: the argument of ``DPSGD`` a ``dpsgd`` entry's ``strengths`` are values of.
DPSGD_STRENGTH: str = DPSGD.strength
#: The sweep's own defaults for DP-SGD (the callback requires a clipping norm).
DPSGD_DEFAULTS: Mapping[str, Any] = {"max_grad_norm": 1.0}
#: Arguments the sweep provides itself: the training seed and the datamodule's held-out batch.
SWEEP_PROVIDED = ("seed", "batch")
#: Keys of the ``audit:`` section that build the attack rather than the callback.
ATTACK_KEYS = ("attack", "options")


def defense_names() -> list[str]:
    """Every name a ``defenses:`` entry accepts: the registered transforms plus the special ones.

    Example:
        >>> defense_names()[:3]
        ['dpsgd', 'gaussian_noise', 'gradient_clipping']
    """
    return sorted({*DEFENSES, *SPECIAL_DEFENSES})


def _factory(name: str) -> Callable[..., Any]:
    """The class a defense name builds (``DPSGD`` for ``"dpsgd"``)."""
    return DPSGD if name == DPSGD_DEFENSE else DEFENSES.get(name)


def strength_parameter(name: str) -> str | None:
    """The argument a defense's strengths are values of (``None``: none is declared).

    The ``strength`` ClassVar of the class the name builds (a transform, or ``DPSGD``: its noise
    multiplier).

    Example:
        >>> strength_parameter("gaussian_noise"), strength_parameter("none")
        ('std', None)
    """
    if name == NO_DEFENSE:
        return None
    strength = getattr(_factory(name), "strength", None)
    return strength if isinstance(strength, str) else None


def _type_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotations of a component's arguments (a dataclass's fields)."""
    if inspect.isclass(factory) and not is_dataclass(factory):
        return get_type_hints(factory.__init__)
    return get_type_hints(factory)


def _is_integer_type(hint: Any) -> bool:
    """``int`` or ``int | None``, but not ``float | int`` or ``bool``."""
    options = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    return int in options and float not in options


def integer_strength(name: str) -> bool:
    """Whether a defense's strength is integer-valued (its field is annotated ``int``).

    Example:
        >>> integer_strength("low_rank"), integer_strength("gaussian_noise")
        (True, False)
    """
    parameter = strength_parameter(name)
    if parameter is None:
        return False
    return _is_integer_type(_type_hints(_factory(name)).get(parameter))


def _keyword_arguments(factory: Callable[..., Any]) -> tuple[str, ...] | None:
    """The names a component accepts as keywords (``None``: it takes any, ``**kwargs``)."""
    parameters = inspect.signature(factory).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in parameters if p.kind in keyword)


def defense_options(name: str) -> tuple[str, ...] | None:
    """The other keys a ``defenses:`` entry may give: the component's arguments but the strength.

    ``None`` when the component accepts any keyword.

    Example:
        >>> defense_options("magnitude_pruning"), defense_options("none")
        (('scope',), ())
    """
    if name == NO_DEFENSE:
        return ()
    names = _keyword_arguments(_factory(name))
    if names is None:
        return None
    return tuple(n for n in names if n != strength_parameter(name))


def _section_arguments(callback: type[Callback]) -> tuple[str, ...]:
    """A callback's keyword arguments, but those the sweep provides."""
    return tuple(n for n in _keyword_arguments(callback) or () if n not in SWEEP_PROVIDED)


def audit_arguments() -> tuple[str, ...]:
    """The keys of the ``audit:`` section: the attack, its options and ``InversionAudit``'s.

    Example:
        >>> audit_arguments()[:3]
        ('attack', 'every_n_epochs', 'every_n_train_steps')
    """
    return (*_section_arguments(InversionAudit), "options")


def leakage_arguments() -> tuple[str, ...]:
    """The keys of the ``leakage:`` section: the arguments of ``LeakageMonitor``.

    Example:
        >>> "estimator" in leakage_arguments(), "seed" in leakage_arguments()
        (True, False)
    """
    return _section_arguments(LeakageMonitor)


def membership_arguments() -> tuple[str, ...]:
    """The keys of the ``membership:`` section: the arguments of ``MembershipAudit``.

    Example:
        >>> "attack" in membership_arguments(), "seed" in membership_arguments()
        (True, False)
    """
    return _section_arguments(MembershipAudit)


def build_transform(name: str, strength: float, options: Mapping[str, Any]) -> GradientTransform:
    """The registered transform ``name`` with its strength and options.

    Raises:
        ValueError: If the transform declares no ``strength``, or for invalid settings.

    Example:
        >>> build_transform("gaussian_noise", 0.1, {})
        GaussianNoise(std=0.1)
    """
    parameter = strength_parameter(name)
    if parameter is None:
        raise ValueError(
            f"Expected the defense {name!r} to declare its `strength` (the argument a sweep "
            f"varies, a ClassVar of {_factory(name).__name__}), but it declares none."
        )
    return DEFENSES.create(name, **{**options, parameter: strength})


def defense_callback(
    name: str, strength: float | None, options: Mapping[str, Any], *, seed: int
) -> Callback | None:
    """The callback of a ``defenses:`` entry at one strength (``None`` for ``"none"``).

    A transform runs in :class:`~lightning_privacy.callbacks.GradientDefense` seeded with
    ``seed``; ``"dpsgd"`` is :class:`~lightning_privacy.callbacks.DPSGD` with the options on top
    of :data:`DPSGD_DEFAULTS`.

    Example:
        >>> defense_callback("dpsgd", 1.0, {"max_grad_norm": 0.5}, seed=0).max_grad_norm
        0.5
        >>> defense_callback("none", None, {}, seed=0) is None
        True
    """
    if name == NO_DEFENSE:
        return None
    if name == DPSGD_DEFENSE:
        return DPSGD(**{**DPSGD_DEFAULTS, **options, DPSGD_STRENGTH: strength})
    if strength is None:
        raise ValueError(f"Expected a strength for the defense {name!r}, but got None.")
    return GradientDefense([build_transform(name, strength, options)], seed=seed)


def audit_callback(section: Mapping[str, Any], *, seed: int) -> InversionAudit:
    """``InversionAudit`` from an ``audit:`` section (the attack built with its ``options``).

    Example:
        >>> audit = audit_callback({"attack": "idlg", "options": {}, "num_samples": 1}, seed=0)
        >>> type(audit.attack).__name__, audit.num_samples
        ('IDLG', 1)
    """
    attack = create_attack(section["attack"], **dict(section.get("options") or {}))
    arguments = {k: v for k, v in section.items() if k not in ATTACK_KEYS}
    return InversionAudit(attack, **arguments, seed=seed)


def leakage_callback(section: Mapping[str, Any], *, seed: int) -> LeakageMonitor:
    """``LeakageMonitor`` from a ``leakage:`` section.

    Example:
        >>> leakage_callback({"estimator": "expected", "num_samples": 1}, seed=0).estimator
        'expected'
    """
    return LeakageMonitor(**section, seed=seed)


def membership_callback(section: Mapping[str, Any], *, seed: int) -> MembershipAudit:
    """``MembershipAudit`` from a ``membership:`` section (its member sample drawn with ``seed``).

    Example:
        >>> audit = membership_callback({"attack": "entropy", "num_samples": 100}, seed=0)
        >>> type(audit.attack).__name__, audit.num_samples
        ('EntropyAttack', 100)
    """
    return MembershipAudit(**section, seed=seed)


class _StrengthParameters(Mapping[str, str]):
    """Defense name -> strength argument, read from the registry on every access."""

    def __getitem__(self, name: str) -> str:
        parameter = strength_parameter(name) if name in defense_names() else None
        if parameter is None:
            raise KeyError(name)
        return parameter

    def __iter__(self) -> Iterator[str]:
        return iter([n for n in defense_names() if strength_parameter(n) is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


#: The strength argument of every defense, by name (a live view of the defense registry).
STRENGTH_PARAMETERS: Mapping[str, str] = _StrengthParameters()
