"""Membership inference as pure functions: attack scores, ROC metrics and audited ε lower bounds.

A membership-inference attack gives every queried example a *score*, higher meaning "more
likely a training member". Everything here takes the scores of known members and known
non-members (1-D tensors, arrays or sequences) and returns plain numbers:

* the ROC curve (:func:`roc_curve`), :func:`auc` with its DeLong interval
  (:func:`auc_confidence_interval`), :func:`tpr_at_fpr` (NaN when there are too few
  non-members to resolve the rate) and the attacker's :func:`advantage` (max TPR - FPR);
* :func:`epsilon_from_rates`: the ε that an attack with these rates proves, for an
  (ε, δ)-DP mechanism must satisfy ``TPR <= e^ε FPR + δ`` and ``1 - FPR <= e^ε (1 - TPR) + δ``;
* :func:`epsilon_lower_bound`: the same at the best threshold, with one-sided Clopper-Pearson
  bounds on both rates (``scipy.stats.beta`` quantiles), the number a reviewer can trust;
* :func:`one_run_epsilon_lower_bound`: Steinke, Nasr and Jagielski (2023), "Privacy Auditing
  with One (1) Training Run": canaries each included with probability ½, the attacker guesses
  the inclusion of the top- and bottom-scored ones, and the number of right guesses bounds ε.

The attack scores themselves (:func:`loss_scores`, :func:`confidence_scores`,
:func:`entropy_scores`, :func:`modified_entropy_scores`, offline LiRA
:func:`lira_offline_scores` and RMIA :func:`rmia_scores`) map a model's logits (and, for the
last two, reference models' logits) to scores. No function here samples except
:func:`bootstrap_interval`, which takes a ``generator``.

Example:
    >>> members, nonmembers = [0.9, 0.8, 0.7, 0.3], [0.6, 0.4, 0.2, 0.1]
    >>> auc(members, nonmembers), advantage(members, nonmembers)
    (0.875, 0.75)
    >>> round(epsilon_from_rates(0.5, 0.1, delta=0.0), 4)  # log(0.5 / 0.1)
    1.6094
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_privacy._validation import check_float, check_int

__all__ = [
    "SUMMARY_FPRS",
    "advantage",
    "auc",
    "auc_confidence_interval",
    "bootstrap_interval",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "confidence_scores",
    "entropy_scores",
    "epsilon_from_rates",
    "epsilon_lower_bound",
    "lira_offline_scores",
    "logit_confidence",
    "loss_scores",
    "membership_summary",
    "modified_entropy_scores",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "rmia_scores",
    "roc_curve",
    "tpr_at_fpr",
]

ArrayLike = Tensor | np.ndarray | Sequence[float]


def _scores(name: str, values: ArrayLike) -> np.ndarray:
    """A finite 1-D float64 array of scores, or an error naming the argument."""
    if isinstance(values, Tensor):
        array = values.detach().cpu().double().numpy()
    else:
        array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"Expected `{name}` to be a non-empty 1-D sequence of scores, but got shape "
            f"{tuple(array.shape)}."
        )
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise ValueError(
            f"Expected `{name}` to hold finite scores, but got {bad} NaN or infinite value(s)."
        )
    return array


def _roc_counts(
    member_scores: ArrayLike, nonmember_scores: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Members and non-members scored ``>= t`` for every distinct threshold ``t`` (and ``+inf``)."""
    members = _scores("member_scores", member_scores)
    nonmembers = _scores("nonmember_scores", nonmember_scores)
    scores = np.concatenate([members, nonmembers])
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # end of each tie group
    true_pos = np.cumsum(labels)[last]
    false_pos = (last + 1) - true_pos
    thresholds = np.r_[np.inf, scores[last]]
    return np.r_[0.0, true_pos], np.r_[0.0, false_pos], thresholds, len(members), len(nonmembers)


def roc_curve(
    member_scores: ArrayLike, nonmember_scores: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC of the rule "member if score >= t", over every distinct threshold ``t``.

    Returns:
        ``(fpr, tpr, thresholds)``, float64 arrays from ``(0, 0)`` at ``t = +inf`` to ``(1, 1)``
        at the lowest score (scikit-learn's ``roc_curve(..., drop_intermediate=False)``).

    Example:
        >>> fpr, tpr, t = roc_curve([3.0, 2.0], [2.0, 1.0])
        >>> fpr.tolist(), tpr.tolist(), t.tolist()
        ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0], [inf, 3.0, 2.0, 1.0])
    """
    true_pos, false_pos, thresholds, m, n = _roc_counts(member_scores, nonmember_scores)
    return false_pos / n, true_pos / m, thresholds


def auc(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> float:
    """Area under the ROC: the chance a random member outscores a random non-member (ties ½).

    Equal to scikit-learn's ``roc_auc_score`` on the same scores (tested).

    Example:
        >>> auc([1.0, 1.0], [1.0, 0.0])
        0.75
    """
    from scipy.stats import rankdata

    members = _scores("member_scores", member_scores)
    nonmembers = _scores("nonmember_scores", nonmember_scores)
    ranks = rankdata(np.concatenate([members, nonmembers]))
    m, n = len(members), len(nonmembers)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def auc_confidence_interval(
    member_scores: ArrayLike, nonmember_scores: ArrayLike, *, confidence: float = 0.95
) -> tuple[float, float]:
    """Two-sided DeLong interval of the AUC (normal approximation, clipped to ``[0, 1]``).

    DeLong, DeLong and Clarke-Pearson (1988): the variance of the Mann-Whitney AUC from the
    placement values of each member among the non-members and vice versa. Deterministic.

    Example:
        >>> low, high = auc_confidence_interval([0.9, 0.8, 0.7, 0.3], [0.6, 0.4, 0.2, 0.1])
        >>> round(low, 3), high
        (0.592, 1.0)
    """
    from scipy.stats import norm, rankdata

    level = check_float("confidence", confidence, low=0.0, high=1.0, low_open=True, high_open=True)
    members = _scores("member_scores", member_scores)
    nonmembers = _scores("nonmember_scores", nonmember_scores)
    m, n = len(members), len(nonmembers)
    if m < 2 or n < 2:
        raise ValueError(
            f"Expected at least 2 members and 2 non-members for an AUC interval, but got {m} "
            f"and {n}."
        )
    combined = rankdata(np.concatenate([members, nonmembers]))
    member_place = (combined[:m] - rankdata(members)) / n  # share of non-members below each
    nonmember_place = 1.0 - (combined[m:] - rankdata(nonmembers)) / m
    value = float(member_place.mean())
    spread = math.sqrt(member_place.var(ddof=1) / m + nonmember_place.var(ddof=1) / n)
    half = float(norm.ppf(0.5 + level / 2)) * spread
    return max(0.0, value - half), min(1.0, value + half)


def tpr_at_fpr(member_scores: ArrayLike, nonmember_scores: ArrayLike, fpr: float) -> float:
    """The highest TPR of a threshold whose FPR is at most ``fpr``.

    NaN when there are fewer than ``1 / fpr`` non-members: the ROC cannot resolve that rate
    (with 500 non-members the first false positive is already an FPR of 0.002).

    Example:
        >>> members, nonmembers = [0.9, 0.8, 0.7, 0.3], [0.6, 0.4, 0.2, 0.1]
        >>> tpr_at_fpr(members, nonmembers, 0.25), tpr_at_fpr(members, nonmembers, 0.01)
        (0.75, nan)
    """
    target = check_float("fpr", fpr, low=0.0, high=1.0, low_open=True)
    rates, tprs, _ = roc_curve(member_scores, nonmember_scores)
    if len(_scores("nonmember_scores", nonmember_scores)) * target < 1.0 - 1e-9:
        return math.nan
    return float(tprs[rates <= target + 1e-12].max())


def advantage(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> float:
    """The attacker's membership advantage: ``max_t TPR(t) - FPR(t)`` (Yeom et al. 2018).

    Example:
        >>> advantage([1.0, 0.0], [1.0, 0.0])
        0.0
    """
    fpr, tpr, _ = roc_curve(member_scores, nonmember_scores)
    return float(max(0.0, (tpr - fpr).max()))


def epsilon_from_rates(tpr: Any, fpr: Any, delta: float) -> Any:
    """The ε an attack with these rates proves: the smallest ε its rates are compatible with.

    ``max(log((tpr - δ) / fpr), log((1 - fpr - δ) / (1 - tpr)), 0)``: an (ε, δ)-DP training
    algorithm cannot be told apart from its neighbour better than this (Kairouz et al. 2015).
    A term with a non-positive numerator contributes 0; a zero denominator with a positive
    numerator gives ``inf``. Works elementwise on NumPy arrays too.

    Args:
        tpr: True-positive rate(s) in ``[0, 1]``.
        fpr: False-positive rate(s) in ``[0, 1]``.
        delta: δ of the guarantee tested, in ``[0, 1)``.

    Example:
        >>> epsilon_from_rates(0.5, 0.5, delta=0.0), epsilon_from_rates(0.3, 0.0, delta=0.0)
        (0.0, inf)
        >>> round(float(epsilon_from_rates(0.99, 0.5, delta=0.0)), 4)  # log(0.5 / 0.01)
        3.912
    """
    check_float("delta", delta, low=0.0, high=1.0, high_open=True)
    t, f = np.asarray(tpr, dtype=np.float64), np.asarray(fpr, dtype=np.float64)
    for name, value in (("tpr", t), ("fpr", f)):
        if not (np.all(np.isfinite(value)) and np.all((value >= 0) & (value <= 1))):
            raise ValueError(f"Expected `{name}` to lie in [0, 1], but got {value.tolist()!r}.")
    with np.errstate(divide="ignore", invalid="ignore"):
        first = _log_ratio(t - delta, f)
        second = _log_ratio(1.0 - f - delta, 1.0 - t)
    result = np.maximum(np.maximum(first, second), 0.0)
    return float(result) if result.ndim == 0 else result


def _log_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``log(numerator / denominator)``; ``-inf`` for numerator <= 0, ``inf`` for a zero base."""
    positive = numerator > 0
    ratio = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.inf)
    return np.where(positive, np.log(np.where(positive, ratio, 1.0)), -np.inf)


def clopper_pearson_lower(successes: Any, trials: Any, alpha: float) -> Any:
    """One-sided Clopper-Pearson lower bound: ``P[rate >= bound] >= 1 - alpha``.

    ``scipy.stats.beta.ppf(alpha, k, n - k + 1)``, and 0 for ``k = 0``.

    Example:
        >>> round(float(clopper_pearson_lower(10, 10, 0.05)), 4)  # 0.05 ** (1 / 10)
        0.7411
    """
    from scipy.stats import beta

    k, n = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    bound = beta.ppf(alpha, np.maximum(k, 1e-300), n - k + 1)
    return np.where(k > 0, bound, 0.0)


def clopper_pearson_upper(successes: Any, trials: Any, alpha: float) -> Any:
    """One-sided Clopper-Pearson upper bound: ``P[rate <= bound] >= 1 - alpha``.

    ``scipy.stats.beta.ppf(1 - alpha, k + 1, n - k)``, and 1 for ``k = n``.

    Example:
        >>> round(float(clopper_pearson_upper(0, 10, 0.05)), 4)  # 1 - 0.05 ** (1 / 10)
        0.2589
    """
    from scipy.stats import beta

    k, n = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    bound = beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1e-300))
    return np.where(k < n, bound, 1.0)


def epsilon_lower_bound(
    member_scores: ArrayLike,
    nonmember_scores: ArrayLike,
    *,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """The ε the attack proves at its best threshold, with Clopper-Pearson bounds on both rates.

    For every threshold the TPR is replaced by its one-sided Clopper-Pearson lower bound and the
    FPR by its upper bound, each at level ``1 - (1 - confidence) / 2`` so that both hold together
    with probability ``>= confidence``; :func:`epsilon_from_rates` of that pair is the ε the
    threshold proves, and the largest over thresholds is returned. Picking the best threshold on
    the same scores is what TensorFlow Privacy and PrivacyGuard report too; it makes the bound
    slightly optimistic (the selection is not corrected for).

    Args:
        member_scores: Scores of the members (higher: more likely a member).
        nonmember_scores: Scores of the non-members.
        delta: δ of the guarantee tested (e.g. the accountant's).
        confidence: Joint confidence of the two rate bounds.

    Example:
        >>> members = [1.0] * 90 + [0.0] * 10
        >>> nonmembers = [1.0] * 10 + [0.0] * 90
        >>> round(epsilon_from_rates(0.9, 0.1, delta=1e-5), 3)  # the point estimate
        2.197
        >>> round(epsilon_lower_bound(members, nonmembers, delta=1e-5), 3)
        1.542
    """
    check_float("delta", delta, low=0.0, high=1.0, high_open=True)
    level = check_float("confidence", confidence, low=0.0, high=1.0, low_open=True, high_open=True)
    true_pos, false_pos, _, m, n = _roc_counts(member_scores, nonmember_scores)
    alpha = (1.0 - level) / 2
    tpr_low = clopper_pearson_lower(true_pos, m, alpha)
    fpr_high = clopper_pearson_upper(false_pos, n, alpha)
    return float(np.max(epsilon_from_rates(tpr_low, fpr_high, delta)))


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses right] for canaries of an (ε, δ)-DP training run.

    Steinke, Nasr and Jagielski (2023), Theorem 3: with ``m`` canaries each included
    independently with probability ½, the right guesses are dominated by
    ``Binomial(r, e^ε / (1 + e^ε))`` up to a δ term, ``2 m δ max_i P[v > B >= v - i] / i``.

    Example:
        >>> round(one_run_p_value(1000, 100, 50, epsilon=0.0, delta=0.0), 4)  # a fair coin
        0.5398
    """
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"Expected 0 <= v <= r <= m, but got v={v}, r={r}, m={m}.")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))
    if v == 0 or delta == 0:
        return min(1.0, tail)
    below = np.cumsum(binom.pmf(v - np.arange(1, v + 1), r, q))  # P[v > B >= v - i]
    worst = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + worst * delta * 2 * m)


def _one_run_epsilon(m: int, r: int, v: int, delta: float, alpha: float) -> float:
    """The largest ε whose p-value for ``v`` right guesses of ``r`` is below ``alpha``."""
    if one_run_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m, r, v, high, delta) < alpha and high < 100:
        low, high = high, high * 2
    for _ in range(40):  # bisection to ~1e-12 of the bracket
        middle = (low + high) / 2
        if one_run_p_value(m, r, v, middle, delta) < alpha:
            low = middle
        else:
            high = middle
    return low


def _default_guesses(m: int) -> tuple[int, ...]:
    """Total guess counts tried by default: 2 %, 5 %, 10 %, 20 %, 50 % and 100 % of ``m``."""
    counts = {max(2, 2 * round(m * share / 2)) for share in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)}
    return tuple(sorted(c for c in counts if c <= m))


def one_run_epsilon_lower_bound(
    scores: ArrayLike,
    included: ArrayLike,
    *,
    delta: float,
    confidence: float = 0.95,
    guesses: Sequence[int] | None = None,
) -> tuple[float, dict[str, int]]:
    """Steinke et al.'s one-run ε lower bound from the canaries' scores and inclusion vector.

    The attacker guesses "included" for the ``r / 2`` highest-scored canaries and "excluded" for
    the ``r / 2`` lowest, abstaining on the rest; ``v`` right guesses out of ``r`` reject every ε
    whose :func:`one_run_p_value` is below ``1 - confidence``. Each guess count of ``guesses``
    is tried at level ``(1 - confidence) / len(guesses)`` (Bonferroni), so the best of them still
    holds at ``confidence``.

    Args:
        scores: One membership score per canary (higher: more likely included).
        included: The secret inclusion vector (0/1 or bool), one per canary.
        delta: δ of the guarantee tested.
        confidence: Confidence of the bound.
        guesses: Total guess counts ``r`` to try (each even, ``<= m``); default: 2 %, 5 %, 10 %,
            20 %, 50 % and 100 % of the ``m`` canaries.

    Returns:
        ``(epsilon, {"guesses": r, "correct": v, "canaries": m})`` of the best guess count.

    Example:
        >>> scores = list(range(200))
        >>> included = [0] * 100 + [1] * 100  # a perfect attack on 200 canaries
        >>> eps, detail = one_run_epsilon_lower_bound(scores, included, delta=0.0)
        >>> round(eps, 2), detail
        (3.72, {'guesses': 200, 'correct': 200, 'canaries': 200})
    """
    values = _scores("scores", scores)
    inclusion = _scores("included", included)
    if inclusion.shape != values.shape or not np.isin(inclusion, (0.0, 1.0)).all():
        raise ValueError(
            "Expected `included` to be a 0/1 vector with one entry per score, but got shape "
            f"{inclusion.shape} for {values.shape[0]} score(s)."
        )
    check_float("delta", delta, low=0.0, high=1.0, high_open=True)
    level = check_float("confidence", confidence, low=0.0, high=1.0, low_open=True, high_open=True)
    m = len(values)
    counts = _default_guesses(m) if guesses is None else tuple(guesses)
    for r in counts:
        check_int("guesses", r, low=2, high=m)
    order = np.argsort(-values, kind="stable")
    ranked = inclusion[order]
    best: tuple[float, dict[str, int]] = (0.0, {"guesses": 0, "correct": 0, "canaries": m})
    for r in counts:
        positive, negative = r - r // 2, r // 2
        right = int(ranked[:positive].sum() + (1 - ranked[m - negative :]).sum())
        eps = _one_run_epsilon(m, r, right, delta, (1.0 - level) / len(counts))
        if eps > best[0]:
            best = (eps, {"guesses": r, "correct": right, "canaries": m})
    return best


#: The FPRs at which :func:`membership_summary` reports the TPR.
SUMMARY_FPRS = (0.01, 0.001)


def membership_summary(
    member_scores: ArrayLike,
    nonmember_scores: ArrayLike,
    *,
    delta: float,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Every number ``MembershipAudit`` logs about one set of scores.

    Returns:
        ``auc`` with its DeLong interval ``auc_low`` / ``auc_high`` (at ``confidence``),
        ``advantage``, ``tpr_at_fpr_0.01`` and ``tpr_at_fpr_0.001`` (NaN when the non-members
        cannot resolve the rate), ``epsilon_lower_bound`` (at ``delta``, ``confidence``).

    Example:
        >>> summary = membership_summary([0.9, 0.8, 0.7, 0.3], [0.6, 0.4, 0.2, 0.1], delta=1e-5)
        >>> summary["auc"], summary["advantage"], summary["tpr_at_fpr_0.01"]
        (0.875, 0.75, nan)
    """
    low, high = auc_confidence_interval(member_scores, nonmember_scores, confidence=confidence)
    summary = {
        "auc": auc(member_scores, nonmember_scores),
        "auc_low": low,
        "auc_high": high,
        "advantage": advantage(member_scores, nonmember_scores),
    }
    for rate in SUMMARY_FPRS:
        summary[f"tpr_at_fpr_{rate:g}"] = tpr_at_fpr(member_scores, nonmember_scores, rate)
    summary["epsilon_lower_bound"] = epsilon_lower_bound(
        member_scores, nonmember_scores, delta=delta, confidence=confidence
    )
    return summary


def bootstrap_interval(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    member_scores: ArrayLike,
    nonmember_scores: ArrayLike,
    *,
    confidence: float = 0.95,
    num_resamples: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(members, nonmembers)``.

    Members and non-members are resampled with replacement, each within its own group, from
    ``generator`` (never the global RNG when one is given). Resamples where the statistic is NaN
    are left out.

    Example:
        >>> members, nonmembers = [0.9, 0.8, 0.7, 0.3], [0.6, 0.4, 0.2, 0.1]
        >>> bootstrap_interval(auc, members, nonmembers, num_resamples=200,
        ...                    generator=torch.Generator().manual_seed(0))
        (0.5, 1.0)
    """
    level = check_float("confidence", confidence, low=0.0, high=1.0, low_open=True, high_open=True)
    check_int("num_resamples", num_resamples, low=1)
    members = _scores("member_scores", member_scores)
    nonmembers = _scores("nonmember_scores", nonmember_scores)
    m, n = len(members), len(nonmembers)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    values = []
    for _ in range(num_resamples):
        pick_m = torch.randint(0, m, (m,), generator=gen).numpy()
        pick_n = torch.randint(0, n, (n,), generator=gen).numpy()
        values.append(statistic(members[pick_m], nonmembers[pick_n]))
    finite = np.asarray([v for v in values if not math.isnan(v)])
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2 * 100
    return float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))


# ---------------------------------------------------------------------------------- attack scores
def _true_class(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 logits and int64 targets, checked against each other."""
    if logits.ndim != 2:
        raise ValueError(
            f"Expected `logits` of shape (N, classes), but got {tuple(logits.shape)}; membership "
            "attacks score classifiers (pass a ModelAdapter whose forward returns logits)."
        )
    targets = targets.reshape(-1).long()
    if len(targets) != len(logits):
        raise ValueError(
            f"Expected one target per row of `logits` ({len(logits)}), but got {len(targets)}."
        )
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise ValueError(
            f"Expected `targets` in [0, {logits.shape[1] - 1}], but got values in "
            f"[{int(targets.min())}, {int(targets.max())}]."
        )
    return logits.detach().double(), targets


def loss_scores(
    logits: Tensor, targets: Tensor, *, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
) -> Tensor:
    """Yeom et al. (2018): minus each example's loss (members are fitted, their loss is low).

    Args:
        logits: ``(N, classes)`` outputs.
        targets: ``(N,)`` class ids.
        loss_fn: The training loss ``loss_fn(outputs, targets) -> scalar``, applied to one example
            at a time (vectorised with ``torch.func.vmap`` where the loss allows it, else in a
            loop); default: cross-entropy.

    Example:
        >>> loss_scores(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0])).round(
        ...     decimals=3)
        tensor([-0.1270, -2.1270], dtype=torch.float64)
        >>> loss_scores(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), loss_fn=F.cross_entropy)
        tensor([-0.1269], dtype=torch.float64)
    """
    if loss_fn is None:
        z, y = _true_class(logits, targets)
        return -F.cross_entropy(z, y, reduction="none")
    return -_per_example_losses(logits, targets, loss_fn).to(torch.float64)


def _per_example_losses(
    logits: Tensor, targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """``loss_fn`` of every example alone: one vectorised call, or a loop where vmap fails."""

    def one(z: Tensor, y: Tensor) -> Tensor:
        return loss_fn(z[None], y[None])

    try:
        losses = torch.func.vmap(one)(logits, targets)
    except Exception:  # a loss vmap cannot batch (data-dependent control flow, .item(), ...)
        losses = None
    if losses is None or losses.shape != (len(logits),):
        return torch.stack(
            [one(z, y).reshape(()) for z, y in zip(logits, targets, strict=True)]
        ).detach()
    return losses.detach()


def confidence_scores(logits: Tensor, targets: Tensor) -> Tensor:
    """The probability the model gives the true class.

    Example:
        >>> confidence_scores(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))
        tensor([0.5000], dtype=torch.float64)
    """
    z, y = _true_class(logits, targets)
    return z.softmax(-1).gather(1, y[:, None])[:, 0]


def entropy_scores(logits: Tensor, targets: Tensor | None = None) -> Tensor:
    """Minus the entropy of the prediction (members get confident, low-entropy outputs).

    Example:
        >>> entropy_scores(torch.tensor([[0.0, 0.0], [10.0, -10.0]])).round(decimals=4)
        tensor([-0.6931, -0.0000], dtype=torch.float64)
    """
    if logits.ndim != 2:
        raise ValueError(f"Expected `logits` of shape (N, classes), but got {tuple(logits.shape)}.")
    log_p = logits.detach().double().log_softmax(-1)
    return (log_p.exp() * log_p).sum(-1)


def modified_entropy_scores(logits: Tensor, targets: Tensor) -> Tensor:
    """Minus Song and Mittal's (2021) modified entropy, which also uses the true label.

    ``Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)``: low for a confident right
    prediction, high for a confident wrong one (plain entropy cannot tell those apart). Computed
    in log space (``log(1 - p_i)`` from the other classes' log-sum-exp), so saturated softmax
    outputs give no NaN.

    Example:
        >>> modified_entropy_scores(torch.tensor([[4.0, 0.0], [0.0, 4.0]]), torch.tensor([0, 0]))
        tensor([-6.5290e-04, -7.8918e+00], dtype=torch.float64)
    """
    z, y = _true_class(logits, targets)
    log_p = z.log_softmax(-1)
    eye = torch.eye(z.shape[1], dtype=torch.bool)
    others = z[:, None, :].masked_fill(eye, -math.inf)  # row i: every class but i
    log_not = others.logsumexp(-1) - z.logsumexp(-1, keepdim=True)  # log(1 - p_i)
    p = log_p.exp()
    true = F.one_hot(y, z.shape[1]).bool()
    own = -(1 - p) * log_p
    rest = -p * log_not
    return -torch.where(true, own, rest).sum(-1)


def logit_confidence(logits: Tensor, targets: Tensor) -> Tensor:
    """LiRA's statistic: ``log(p_y / (1 - p_y))``, from the logits without rounding to 0 or 1.

    Example:
        >>> logit_confidence(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
        tensor([1.], dtype=torch.float64)
    """
    z, y = _true_class(logits, targets)
    true = z.gather(1, y[:, None])[:, 0]
    others = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -math.inf).logsumexp(-1)
    return true - others


def _reference_stack(reference_logits: Tensor, n: int) -> Tensor:
    if reference_logits.ndim != 3 or reference_logits.shape[1] != n:
        raise ValueError(
            "Expected `reference_logits` of shape (reference models, N, classes) with N = "
            f"{n}, but got {tuple(reference_logits.shape)}."
        )
    return reference_logits


def _out_mask(out_mask: Tensor | None, k: int, n: int) -> Tensor:
    """Which reference models did *not* train on each example (default: none did)."""
    mask = torch.ones(k, n, dtype=torch.bool) if out_mask is None else out_mask.bool().cpu()
    if tuple(mask.shape) != (k, n):
        raise ValueError(
            f"Expected `out_mask` of shape ({k}, {n}) (reference models, examples), but got "
            f"{tuple(mask.shape)}."
        )
    missing = int((mask.sum(0) == 0).sum())
    if missing:
        raise ValueError(
            f"Expected every example to be left out of at least one reference model, but {missing}"
            " example(s) are in all of them: train more reference models on random halves."
        )
    return mask


def lira_offline_scores(
    logits: Tensor,
    targets: Tensor,
    reference_logits: Tensor,
    *,
    out_mask: Tensor | None = None,
    fixed_variance: bool = True,
) -> Tensor:
    """Offline LiRA (Carlini et al. 2022): how far above the reference models' OUT fit it is.

    For each example the logit-scaled confidence :func:`logit_confidence` of the reference models
    that did not train on it is fitted by a Gaussian ``N(mu_out, sigma_out^2)``; the score is
    ``(phi_target - mu_out) / sigma_out``, monotone in the paper's one-sided
    ``Pr[Z < phi_target]``. ``fixed_variance`` pools ``sigma_out`` over all examples (the paper's
    choice with few reference models); otherwise each example needs two OUT models.

    Args:
        logits: ``(N, classes)`` target-model logits.
        targets: ``(N,)`` class ids.
        reference_logits: ``(K, N, classes)`` logits of K reference models on the same examples.
        out_mask: ``(K, N)`` bool, True where reference model k did not train on example n;
            default: all True (reference models trained without any audited example).
        fixed_variance: One ``sigma_out`` for every example.

    Example:
        >>> refs = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[2.0, 0.0]]])  # phi = 0, 1, 2
        >>> lira_offline_scores(torch.tensor([[3.0, 0.0]]), torch.tensor([0]), refs)
        tensor([2.], dtype=torch.float64)
    """
    phi = logit_confidence(logits, targets)
    refs = _reference_stack(reference_logits, len(phi))
    k, n = refs.shape[0], len(phi)
    mask = _out_mask(out_mask, k, n).double()
    ref_phi = torch.stack([logit_confidence(refs[j], targets) for j in range(k)])
    count = mask.sum(0)
    mean = (ref_phi * mask).sum(0) / count
    residual = (ref_phi - mean) * mask
    if fixed_variance:
        dof = max(float(mask.sum() - n), 1.0)
        std = torch.full_like(mean, math.sqrt(float(residual.square().sum()) / dof))
    else:
        if int(count.min()) < 2:
            raise ValueError(
                "Expected at least 2 OUT reference models per example with fixed_variance=False, "
                f"but some example has {int(count.min())}; train more or use fixed_variance=True."
            )
        std = (residual.square().sum(0) / (count - 1)).sqrt()
    return (phi - mean) / std.clamp_min(1e-12)


def _offline_probability(
    reference_logits: Tensor, targets: Tensor, mask: Tensor, offline_a: float
) -> Tensor:
    """RMIA's offline ``Pr(x) = ((1 + a) Pr_out(x) + (1 - a)) / 2`` over the OUT models."""
    probs = torch.stack([confidence_scores(r, targets) for r in reference_logits])
    weights = mask.double()
    p_out = (probs * weights).sum(0) / weights.sum(0)
    return ((1 + offline_a) * p_out + (1 - offline_a)) / 2


def rmia_scores(
    logits: Tensor,
    targets: Tensor,
    reference_logits: Tensor,
    population_logits: Tensor,
    population_targets: Tensor,
    population_reference_logits: Tensor,
    *,
    out_mask: Tensor | None = None,
    offline_a: float = 0.3,
    gamma: float = 1.0,
) -> Tensor:
    """RMIA (Zarifzadeh et al. 2024), offline: how often x beats population samples z.

    ``LR(x, z) = (Pr(x | θ) / Pr(x)) / (Pr(z | θ) / Pr(z))`` with ``Pr(· | θ)`` the target's
    true-class probability and ``Pr(·)`` its average over reference models (offline: OUT models
    only, linearly corrected with ``offline_a``); the score of x is the share of population
    samples z with ``LR(x, z) >= gamma``.

    Args:
        logits: ``(N, classes)`` target logits on the audited examples.
        targets: ``(N,)`` their class ids.
        reference_logits: ``(K, N, classes)`` reference logits on them.
        population_logits: ``(M, classes)`` target logits on population samples (trained on by
            nobody).
        population_targets: ``(M,)`` their class ids.
        population_reference_logits: ``(K, M, classes)`` reference logits on them.
        out_mask: ``(K, N)`` bool, True where reference model k did not train on example n.
        offline_a: The offline correction ``a`` (the paper fits it on reference models; 0.3).
        gamma: The likelihood-ratio threshold (the paper's offline setting: 1).

    Example:
        >>> refs = torch.zeros(2, 2, 2)  # reference models unsure about everything
        >>> pop_refs = torch.zeros(2, 3, 2)
        >>> rmia_scores(torch.tensor([[3.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 0]), refs,
        ...             torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]]),
        ...             torch.tensor([0, 0, 0]), pop_refs)
        tensor([1.0000, 0.6667], dtype=torch.float64)
    """
    check_float("offline_a", offline_a, low=0.0, high=1.0)
    check_float("gamma", gamma, low=0.0, low_open=True)
    p_x = confidence_scores(logits, targets)
    refs = _reference_stack(reference_logits, len(p_x))
    mask = _out_mask(out_mask, refs.shape[0], len(p_x))
    ratio_x = p_x / _offline_probability(refs, targets.reshape(-1).long(), mask, offline_a)
    p_z = confidence_scores(population_logits, population_targets)
    pop_refs = _reference_stack(population_reference_logits, len(p_z))
    all_out = torch.ones(pop_refs.shape[0], len(p_z), dtype=torch.bool)
    z_targets = population_targets.reshape(-1).long()
    ratio_z = p_z / _offline_probability(pop_refs, z_targets, all_out, offline_a)
    ordered = ratio_z.sort().values
    beaten = torch.searchsorted(ordered, ratio_x / gamma, right=True)
    return beaten.double() / len(ordered)
