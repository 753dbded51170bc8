"""Argument checks shared by every layer.

Every message follows one template: ``Expected `name` to be <what>, but got <value> (<type>).``

Example:
    >>> from lightning_privacy._validation import check_float
    >>> check_float("std", 0.5, low=0.0)
    0.5
    >>> check_float("std", -1, low=0.0)
    Traceback (most recent call last):
    ...
    ValueError: Expected `std` to be a finite float >= 0.0, but got -1 (int).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def describe(value: Any) -> str:
    """Return ``"<repr> (<type>)"`` for an error message.

    Example:
        >>> describe(-1)
        '-1 (int)'
    """
    return f"{value!r} ({type(value).__name__})"


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Validate a finite real number inside ``[low, high]`` (bounds optionally open).

    Args:
        name: Argument name used in the message.
        value: The value received.
        low: Lower bound, or ``None``.
        high: Upper bound, or ``None``.
        low_open: Exclude ``low`` itself.
        high_open: Exclude ``high`` itself.

    Returns:
        The value as ``float``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is not finite or outside the range.

    Example:
        >>> check_float("ratio", 0.9, low=0.0, high=1.0, high_open=True)
        0.9
    """
    span = _range_text(low, high, low_open, high_open)
    what = f"a finite float {span}".rstrip()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be {what}, but got {describe(value)}.")
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"Expected `{name}` to be {what}, but got {describe(value)}.")
    return float(value)


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Validate an integer inside ``[low, high]``.

    Example:
        >>> check_int("rank", 2, low=1)
        2
    """
    span = _range_text(low, high, False, False)
    what = f"an int {span}".rstrip()
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be {what}, but got {describe(value)}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"Expected `{name}` to be {what}, but got {describe(value)}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Validate a flag (``True``/``False``; ``0``/``1`` and other truthy values are rejected).

    Example:
        >>> check_bool("draw_noise_ahead", False)
        False
    """
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, but got {describe(value)}.")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Validate that ``value`` is one of ``choices``.

    A bool matches only a bool choice and a bool choice only a bool (``1 == True`` in Python, but
    ``1`` is not the flag ``True`` and ``True`` is not the channel count ``1``).

    Example:
        >>> check_choice("placement", "local", ("auto", "local", "aggregate"))
        'local'
        >>> check_choice("line_search", 1, (True, False))
        Traceback (most recent call last):
        ...
        ValueError: Expected `line_search` to be one of True, False, but got 1 (int).
    """
    options = tuple(choices)
    if not any(_same_choice(value, option) for option in options):
        allowed = ", ".join(repr(c) for c in options)
        raise ValueError(f"Expected `{name}` to be one of {allowed}, but got {describe(value)}.")
    return value


def _same_choice(value: Any, option: Any) -> bool:
    if isinstance(value, bool) != isinstance(option, bool):
        return False
    try:
        return bool(value == option)
    except Exception:  # an array or another object without a plain ==
        return False


def check_optional_schedule(
    every_n_epochs: int | None, every_n_train_steps: int | None
) -> tuple[int | None, int | None]:
    """Validate a pair of mutually exclusive schedules; neither means once per epoch.

    Returns:
        ``(every_n_epochs, every_n_train_steps)`` with the default applied.

    Example:
        >>> check_optional_schedule(None, None)
        (1, None)
        >>> check_optional_schedule(None, 50)
        (None, 50)
    """
    if every_n_epochs is not None and every_n_train_steps is not None:
        raise ValueError(
            "Expected at most one of `every_n_epochs` and `every_n_train_steps`, but got "
            f"every_n_epochs={every_n_epochs!r} and every_n_train_steps={every_n_train_steps!r}."
        )
    if every_n_train_steps is not None:
        return None, check_int("every_n_train_steps", every_n_train_steps, low=1)
    if every_n_epochs is not None:
        return check_int("every_n_epochs", every_n_epochs, low=1), None
    return 1, None
