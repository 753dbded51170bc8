"""The membership metrics and ε bounds against closed forms, scipy's quantiles and scikit-learn."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import beta, binom
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from lightning_privacy.functional import membership as M


def _scores(seed, n=300, shift=0.5, ties=False):
    rng = np.random.default_rng(seed)
    members, nonmembers = rng.normal(shift, 1, n), rng.normal(0, 1, n + 17)
    if ties:  # coarse scores: many ties inside and across the groups
        members, nonmembers = np.round(members, 1), np.round(nonmembers, 1)
    return members, nonmembers


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_roc_equal_scikit_learn(seed, ties):
    members, nonmembers = _scores(seed, ties=ties)
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    scores = np.r_[members, nonmembers]
    assert M.auc(members, nonmembers) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, thresholds = M.roc_curve(members, nonmembers)
    sk_fpr, sk_tpr, sk_thresholds = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thresholds[1:], sk_thresholds[1:])
    assert M.advantage(members, nonmembers) == pytest.approx(float(np.max(sk_tpr - sk_fpr)))


def test_tpr_at_fpr_is_the_best_tpr_within_the_rate_and_nan_below_its_resolution():
    members, nonmembers = _scores(3, n=1000)
    fpr, tpr, _ = M.roc_curve(members, nonmembers)
    for target in (0.001, 0.01, 0.1):
        assert M.tpr_at_fpr(members, nonmembers, target) == tpr[fpr <= target].max()
    # 317 non-members: an FPR of 0.01 is resolved (>= 100), 0.001 is not (< 1000)
    small = nonmembers[:317]
    assert not math.isnan(M.tpr_at_fpr(members, small, 0.01))
    assert math.isnan(M.tpr_at_fpr(members, small, 0.001))
    assert not math.isnan(M.tpr_at_fpr(members, nonmembers[:1000], 0.001))


@pytest.mark.parametrize(
    ("tpr", "fpr", "delta", "expected"),
    [
        (0.5, 0.1, 0.0, math.log(5.0)),
        (0.5, 0.1, 1e-3, math.log((0.5 - 1e-3) / 0.1)),
        (0.95, 0.6, 0.0, math.log(0.4 / 0.05)),  # the second term wins
        (0.95, 0.6, 0.01, math.log((1 - 0.6 - 0.01) / 0.05)),
        (0.3, 0.4, 0.0, 0.0),  # worse than guessing proves nothing
        (0.2, 0.0, 0.0, math.inf),
        (1.0, 0.5, 0.0, math.inf),
        (1e-6, 0.0, 1e-5, 0.0),  # tpr <= delta: the first term has nothing to show
    ],
)
def test_epsilon_from_rates_closed_form(tpr, fpr, delta, expected):
    assert M.epsilon_from_rates(tpr, fpr, delta) == pytest.approx(expected)


def test_epsilon_from_rates_is_elementwise_and_refuses_rates_outside_the_unit_interval():
    got = M.epsilon_from_rates(np.array([0.5, 0.95]), np.array([0.1, 0.6]), 0.0)
    np.testing.assert_allclose(got, [math.log(5.0), math.log(8.0)])
    with pytest.raises(ValueError, match=r"`tpr` to lie in \[0, 1\], but got 1.5"):
        M.epsilon_from_rates(1.5, 0.1, 0.0)
    with pytest.raises(ValueError, match=r"Expected `delta` to be a finite float >= 0.0 and < 1.0"):
        M.epsilon_from_rates(0.5, 0.1, 1.0)


@pytest.mark.parametrize(("k", "n"), [(0, 20), (1, 20), (7, 20), (19, 20), (20, 20), (450, 1000)])
def test_clopper_pearson_bounds_are_scipys_beta_quantiles_and_exact(k, n):
    alpha = 0.025
    low, high = M.clopper_pearson_lower(k, n, alpha), M.clopper_pearson_upper(k, n, alpha)
    assert low == (0.0 if k == 0 else pytest.approx(beta.ppf(alpha, k, n - k + 1), rel=1e-12))
    assert high == (1.0 if k == n else pytest.approx(beta.ppf(1 - alpha, k + 1, n - k), rel=1e-12))
    # the defining property: the binomial tail at the bound is exactly alpha
    if k > 0:
        assert binom.sf(k - 1, n, low) == pytest.approx(alpha, rel=1e-6)
    if k < n:
        assert binom.cdf(k, n, high) == pytest.approx(alpha, rel=1e-6)


def _brute_force_bound(members, nonmembers, delta, confidence):
    """Every threshold, the rates counted by hand, scipy's beta quantiles, the closed form."""
    alpha = (1 - confidence) / 2
    m, n = len(members), len(nonmembers)
    best = 0.0
    for t in np.unique(np.r_[members, nonmembers]):
        tp, fp = int((members >= t).sum()), int((nonmembers >= t).sum())
        tpr = beta.ppf(alpha, tp, m - tp + 1) if tp > 0 else 0.0
        fpr = beta.ppf(1 - alpha, fp + 1, n - fp) if fp < n else 1.0
        terms = [0.0]
        if tpr - delta > 0:
            terms.append(math.log((tpr - delta) / fpr))
        if 1 - fpr - delta > 0:
            terms.append(math.log((1 - fpr - delta) / (1 - tpr)))
        best = max(best, *terms)
    return best


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_epsilon_lower_bound_equals_the_brute_force_over_thresholds(seed, confidence):
    members, nonmembers = _scores(seed, n=120, shift=1.5, ties=True)
    got = M.epsilon_lower_bound(members, nonmembers, delta=1e-5, confidence=confidence)
    assert got == pytest.approx(_brute_force_bound(members, nonmembers, 1e-5, confidence))
    assert got > 0.5  # a strong attack proves something


def test_epsilon_lower_bound_is_below_the_point_estimate_and_tightens_with_samples():
    members = np.r_[np.ones(90), np.zeros(10)]
    nonmembers = np.r_[np.ones(10), np.zeros(90)]
    point = M.epsilon_from_rates(0.9, 0.1, 1e-5)
    small = M.epsilon_lower_bound(members, nonmembers, delta=1e-5)
    large = M.epsilon_lower_bound(np.tile(members, 10), np.tile(nonmembers, 10), delta=1e-5)
    assert small < large < point
    assert M.epsilon_lower_bound(members, nonmembers, delta=1e-5, confidence=0.99) < small


def test_epsilon_lower_bound_of_a_perfect_attack_is_finite_and_grows_with_the_sample():
    bounds = [M.epsilon_lower_bound(np.ones(n), np.zeros(n), delta=0.0) for n in (10, 100, 1000)]
    # perfect separation: tpr_low = (alpha)^(1/n), fpr_high = 1 - alpha^(1/n)
    a = 0.025
    expected = [math.log(a ** (1 / n) / (1 - a ** (1 / n))) for n in (10, 100, 1000)]
    assert bounds == pytest.approx(expected)
    assert bounds[0] < bounds[1] < bounds[2] < math.inf


def test_identical_distributions_prove_no_epsilon_at_95_percent():
    rng = np.random.default_rng(7)
    hits = [
        M.epsilon_lower_bound(rng.normal(size=500), rng.normal(size=500), delta=1e-5) > 0
        for _ in range(20)
    ]
    assert sum(hits) <= 3  # a 5 % level per run, the best of ~1000 thresholds


def test_auc_interval_covers_one_half_for_random_scores_and_matches_the_bootstrap():
    members, nonmembers = _scores(11, n=400, shift=0.0)
    low, high = M.auc_confidence_interval(members, nonmembers)
    assert low < 0.5 < high
    boot = M.bootstrap_interval(
        M.auc, members, nonmembers, num_resamples=400, generator=torch.Generator().manual_seed(0)
    )
    assert boot[0] == pytest.approx(low, abs=0.015) and boot[1] == pytest.approx(high, abs=0.015)
    shifted = M.auc_confidence_interval(*_scores(11, n=400, shift=1.0))
    assert shifted[0] > 0.7


def test_bootstrap_draws_only_from_its_generator():
    members, nonmembers = _scores(0, n=50)
    state = torch.get_rng_state()
    a = M.bootstrap_interval(
        M.auc, members, nonmembers, num_resamples=50, generator=torch.Generator().manual_seed(3)
    )
    b = M.bootstrap_interval(
        M.auc, members, nonmembers, num_resamples=50, generator=torch.Generator().manual_seed(3)
    )
    assert a == b and torch.equal(state, torch.get_rng_state())


def test_scores_refuse_nan_and_empty_input_naming_the_argument():
    with pytest.raises(ValueError, match="`nonmember_scores` to hold finite scores, but got 1 NaN"):
        M.auc([0.1, 0.2], [0.3, math.nan])
    with pytest.raises(ValueError, match="`member_scores` to be a non-empty 1-D"):
        M.auc([], [0.3])


# ------------------------------------------------------------------- Steinke et al.'s one-run audit
def _p_value_by_hand(m, r, v, eps, delta):
    q = 1 / (1 + math.exp(-eps))
    tail = sum(binom.pmf(j, r, q) for j in range(v, r + 1))
    worst, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += binom.pmf(v - i, r, q)
        worst = max(worst, below / i)
    return min(1.0, tail + 2 * m * delta * worst)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [(1000, 100, 80, 1.0, 1e-5), (1000, 100, 60, 0.5, 0.0), (200, 200, 150, 2.0, 1e-4)],
)
def test_one_run_p_value_is_the_theorem(m, r, v, eps, delta):
    assert M.one_run_p_value(m, r, v, eps, delta) == pytest.approx(
        _p_value_by_hand(m, r, v, eps, delta), rel=1e-9
    )


def test_one_run_bound_of_perfect_guesses_is_the_closed_form():
    # all r guesses right, delta = 0: P[Bin(r, q) = r] = q^r < alpha  <=>  eps > logit(alpha^(1/r))
    scores, included = np.arange(100.0), np.r_[np.zeros(50), np.ones(50)]
    eps, detail = M.one_run_epsilon_lower_bound(scores, included, delta=0.0, guesses=[100])
    q = 0.05 ** (1 / 100)
    assert eps == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert detail == {"guesses": 100, "correct": 100, "canaries": 100}
    # two guess counts share the 5 %: each is tested at 2.5 %
    eps2, _ = M.one_run_epsilon_lower_bound(scores, included, delta=0.0, guesses=[50, 100])
    q2 = 0.025 ** (1 / 100)
    assert eps2 == pytest.approx(math.log(q2 / (1 - q2)), abs=1e-6)


def test_one_run_bound_is_zero_for_scores_independent_of_inclusion():
    rng = np.random.default_rng(0)
    zeros = [
        M.one_run_epsilon_lower_bound(rng.normal(size=1000), rng.integers(0, 2, 1000), delta=1e-5)[
            0
        ]
        for _ in range(10)
    ]
    assert sum(z > 0 for z in zeros) <= 1


def test_one_run_bound_refuses_a_bad_inclusion_vector():
    with pytest.raises(ValueError, match="`included` to be a 0/1 vector"):
        M.one_run_epsilon_lower_bound([1.0, 2.0], [0, 2], delta=0.0)


# ---------------------------------------------------------------------------------- attack scores
def _logits(n=50, c=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale, torch.randint(0, c, (n,), generator=g)


def test_threshold_scores_match_their_definitions():
    logits, y = _logits()
    p = logits.double().softmax(-1)
    torch.testing.assert_close(
        M.loss_scores(logits, y), -F.cross_entropy(logits.double(), y, reduction="none")
    )
    torch.testing.assert_close(M.confidence_scores(logits, y), p[torch.arange(50), y])
    torch.testing.assert_close(M.entropy_scores(logits), (p * p.log()).sum(-1))
    naive = []
    for row, label in zip(p, y, strict=True):
        own = -(1 - row[label]) * row[label].log()
        rest = sum(-row[i] * (1 - row[i]).log() for i in range(5) if i != label)
        naive.append(-(own + rest))
    torch.testing.assert_close(M.modified_entropy_scores(logits, y), torch.stack(naive))


def test_loss_scores_use_the_given_loss_per_example():
    logits, y = _logits(n=6)
    smooth = lambda out, t: F.cross_entropy(out, t, label_smoothing=0.2)  # noqa: E731
    expected = -F.cross_entropy(logits, y, label_smoothing=0.2, reduction="none").double()
    torch.testing.assert_close(M.loss_scores(logits, y, loss_fn=smooth), expected)


def test_modified_entropy_is_finite_when_the_softmax_saturates():
    logits = torch.tensor([[200.0, 0.0, 0.0], [0.0, 200.0, 0.0]])
    scores = M.modified_entropy_scores(logits, torch.tensor([0, 0]))
    assert torch.isfinite(scores).all() and scores[0] > scores[1]
    assert torch.isfinite(M.logit_confidence(logits, torch.tensor([0, 0]))).all()


def test_lira_offline_is_the_z_score_of_the_out_gaussian():
    logits, y = _logits(n=20, seed=1)
    refs = torch.stack([_logits(n=20, seed=10 + k)[0] for k in range(6)])
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(6, 20, generator=g) < 0.6
    mask[0] = True  # every example is out of model 0 at least
    phi = M.logit_confidence(logits, y).numpy()
    ref_phi = np.stack([M.logit_confidence(r, y).numpy() for r in refs])
    means = np.array([ref_phi[mask[:, i].numpy(), i].mean() for i in range(20)])
    resid = np.concatenate([ref_phi[mask[:, i].numpy(), i] - means[i] for i in range(20)])
    pooled = math.sqrt((resid**2).sum() / (mask.sum().item() - 20))
    got = M.lira_offline_scores(logits, y, refs, out_mask=mask).numpy()
    np.testing.assert_allclose(got, (phi - means) / pooled)
    full = torch.ones(6, 20, dtype=torch.bool)
    per_example = M.lira_offline_scores(logits, y, refs, out_mask=full, fixed_variance=False)
    np.testing.assert_allclose(
        per_example.numpy(), (phi - ref_phi.mean(0)) / ref_phi.std(0, ddof=1)
    )
    with pytest.raises(ValueError, match="left out of at least one reference model"):
        M.lira_offline_scores(logits, y, refs, out_mask=torch.zeros(6, 20, dtype=torch.bool))


def test_rmia_is_the_share_of_population_samples_beaten():
    logits, y = _logits(n=15, seed=2)
    refs = torch.stack([_logits(n=15, seed=20 + k)[0] for k in range(4)])
    pop, pop_y = _logits(n=30, seed=3)
    pop_refs = torch.stack([_logits(n=30, seed=30 + k)[0] for k in range(4)])
    a, gamma = 0.3, 1.5

    def prob(z, t):
        return z.double().softmax(-1)[torch.arange(len(t)), t].numpy()

    px = prob(logits, y)
    ref_x = np.mean([prob(r, y) for r in refs], axis=0)
    pz = prob(pop, pop_y)
    ref_z = np.mean([prob(r, pop_y) for r in pop_refs], axis=0)
    ratio_x = px / (((1 + a) * ref_x + (1 - a)) / 2)
    ratio_z = pz / (((1 + a) * ref_z + (1 - a)) / 2)
    expected = [(ratio_x[i] / ratio_z >= gamma).mean() for i in range(15)]
    got = M.rmia_scores(logits, y, refs, pop, pop_y, pop_refs, offline_a=a, gamma=gamma)
    np.testing.assert_allclose(got.numpy(), expected)


def test_scores_refuse_labels_outside_the_logits():
    with pytest.raises(ValueError, match=r"`targets` in \[0, 1\], but got values in \[0, 2\]"):
        M.confidence_scores(torch.zeros(2, 2), torch.tensor([0, 2]))


def test_a_loss_vmap_cannot_batch_is_applied_one_example_at_a_time():
    logits, y = _logits(n=6)

    def branching(out, t):  # .item() inside: torch.func.vmap refuses it
        loss = F.cross_entropy(out, t)
        return loss * 2 if loss.item() > 1.0 else loss

    plain = F.cross_entropy(logits, y, reduction="none")
    expected = -torch.where(plain > 1.0, plain * 2, plain).double()
    torch.testing.assert_close(M.loss_scores(logits, y, loss_fn=branching), expected)
