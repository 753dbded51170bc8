"""Privacy accounting as plain functions over Opacus's accountants (no re-implementation).

Two mechanisms are covered:

* **DP-SGD** (per-sample clipping to ``C`` + Gaussian noise ``N(0, (z*C)^2)`` on the clipped
  sum, batches drawn by Poisson sampling at rate ``q``): :func:`dpsgd_epsilon` and
  :func:`dpsgd_noise_multiplier` delegate to Opacus's RDP / PRV / GDP accountants and to
  ``opacus.accountants.utils.get_noise_multiplier``.
* **Batch clipping** (the *batch* gradient clipped to norm ``C``, then ``N(0, std^2)`` added,
  every example in exactly one batch per epoch): :func:`batch_clipping_noise_multiplier` and
  :func:`batch_clipping_epsilon`. Under replace-one adjacency the clipped batch gradient moves by
  at most ``2C``, so one epoch is one Gaussian mechanism with multiplier ``std / (2C)`` and no
  sampling amplification; epochs compose with Opacus's RDP analysis at ``sample_rate=1``.

Example:
    >>> round(dpsgd_epsilon(noise_multiplier=1.1, sample_rate=256 / 60000, steps=14100,
    ...                     delta=1e-5), 3)
    2.6
    >>> batch_clipping_noise_multiplier(max_grad_norm=1.0, std=4.0)
    2.0
"""

from __future__ import annotations

import math
from typing import Any

from opacus.accountants import create_accountant as _opacus_create
from opacus.accountants.utils import get_noise_multiplier as _opacus_noise_multiplier

from lightning_privacy._validation import check_choice, check_float, check_int

#: The accountants of Opacus that :func:`dpsgd_epsilon` can use.
OPACUS_MECHANISMS = ("rdp", "prv", "gdp")


def check_delta(delta: Any, name: str = "delta") -> float:
    """Validate a failure probability ``0 < delta < 1``.

    Example:
        >>> check_delta(1e-5)
        1e-05
    """
    return check_float(name, delta, low=0.0, high=1.0, low_open=True, high_open=True)


def check_delta_for_dataset(delta: Any, dataset_size: int, name: str = "target_delta") -> float:
    """Validate ``0 < delta < 1 / N`` for a training set of ``N`` examples.

    A δ of ``1 / N`` or more allows a mechanism that publishes one example outright, so the
    reported ε would mean nothing; every callback that takes δ applies this check once it knows
    ``N``.

    Raises:
        TypeError: If ``delta`` is not a real number.
        ValueError: If it is outside ``(0, 1 / N)``, naming ``N``, the bound and the value.

    Example:
        >>> check_delta_for_dataset(1e-4, 1000)
        0.0001
        >>> check_delta_for_dataset(0.5, 1000)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected `target_delta` to be > 0 and < 1/N = 0.001 ... but got 0.5 (float).
    """
    value = check_delta(delta, name)
    n = check_int("dataset_size", dataset_size, low=1)
    if value >= 1.0 / n:
        raise ValueError(
            f"Expected `{name}` to be > 0 and < 1/N = {1.0 / n:.3g} (N={n} training examples; a "
            f"larger δ allows publishing an example outright), but got {delta!r} "
            f"({type(delta).__name__})."
        )
    return value


def dpsgd_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε(δ) of ``steps`` Poisson-subsampled Gaussian steps, from Opacus's own accountant.

    Args:
        noise_multiplier: ``z``; noise std is ``z * max_grad_norm`` on the clipped sum.
        sample_rate: Poisson inclusion probability ``q`` of each example per step.
        steps: Number of noisy optimizer steps.
        delta: Target δ.
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.

    Returns:
        ε, never negative: ``0.0`` after zero steps and where Opacus's conversion of a large δ
        goes below zero (every mechanism is ``(0, δ)``-DP for a δ that large), ``inf`` for
        ``noise_multiplier == 0``.

    Example:
        >>> dpsgd_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=0, delta=1e-5)
        0.0
        >>> dpsgd_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=0.5)
        0.0
    """
    z = check_float("noise_multiplier", noise_multiplier, low=0.0)
    q = check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
    n = check_int("steps", steps, low=0)
    d = check_delta(delta)
    check_choice("accountant", accountant, OPACUS_MECHANISMS)
    if n == 0:
        return 0.0
    if z == 0.0:
        return math.inf
    acct = _opacus_create(mechanism=accountant)
    acct.history = [(z, q, n)]
    return max(0.0, float(acct.get_epsilon(delta=d)))


def dpsgd_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to ``epsilon_tolerance``) that keeps ε ≤ ``target_epsilon``.

    Thin over ``opacus.accountants.utils.get_noise_multiplier``.

    Raises:
        ValueError: If the budget needs a noise multiplier above Opacus's limit (1e6).

    Example:
        >>> z = dpsgd_noise_multiplier(target_epsilon=3.0, target_delta=1e-5,
        ...                            sample_rate=0.01, steps=1000)
        >>> eps = dpsgd_epsilon(noise_multiplier=z, sample_rate=0.01, steps=1000, delta=1e-5)
        >>> 2.99 <= eps <= 3.0
        True
    """
    eps = check_float("target_epsilon", target_epsilon, low=0.0, low_open=True)
    d = check_delta(target_delta, "target_delta")
    q = check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
    n = check_int("steps", steps, low=1)
    check_choice("accountant", accountant, OPACUS_MECHANISMS)
    tol = check_float("epsilon_tolerance", epsilon_tolerance, low=0.0, low_open=True)
    return float(
        _opacus_noise_multiplier(
            target_epsilon=eps,
            target_delta=d,
            sample_rate=q,
            steps=n,
            accountant=accountant,
            epsilon_tolerance=tol,
        )
    )


def batch_clipping_noise_multiplier(*, max_grad_norm: float, std: float) -> float:
    """Noise multiplier ``std / (2 * max_grad_norm)`` of batch clipping + Gaussian noise.

    The batch gradient clipped to norm ``C`` changes by at most ``2C`` when one example of the
    batch is replaced (both clipped vectors lie in the ball of radius ``C``).

    Example:
        >>> batch_clipping_noise_multiplier(max_grad_norm=0.5, std=1.0)
        1.0
    """
    c = check_float("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
    s = check_float("std", std, low=0.0, low_open=True)
    return s / (2.0 * c)


def batch_clipping_epsilon(
    *, max_grad_norm: float, std: float, epochs: int, delta: float, releases_per_epoch: int = 1
) -> float:
    """ε(δ) of ``epochs`` epochs of batch clipping + Gaussian noise (replace-one adjacency).

    One Gaussian mechanism with multiplier ``std / (2C)`` per release an example takes part in:
    ``releases_per_epoch`` per epoch (``1`` when each example is in one batch per epoch and every
    batch is stepped once), composed ``epochs * releases_per_epoch`` times by Opacus's RDP
    analysis at ``sample_rate=1`` (no amplification by sampling).

    Example:
        >>> e1 = batch_clipping_epsilon(max_grad_norm=1.0, std=20.0, epochs=1, delta=1e-5)
        >>> e4 = batch_clipping_epsilon(max_grad_norm=1.0, std=20.0, epochs=4, delta=1e-5)
        >>> e1x4 = batch_clipping_epsilon(max_grad_norm=1.0, std=20.0, epochs=1, delta=1e-5,
        ...                               releases_per_epoch=4)
        >>> 0 < e1 < e4 == e1x4
        True
    """
    z = batch_clipping_noise_multiplier(max_grad_norm=max_grad_norm, std=std)
    e = check_int("epochs", epochs, low=0)
    r = check_int("releases_per_epoch", releases_per_epoch, low=0)
    return dpsgd_epsilon(
        noise_multiplier=z, sample_rate=1.0, steps=e * r, delta=delta, accountant="rdp"
    )
