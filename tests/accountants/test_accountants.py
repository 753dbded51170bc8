import math

import opacus.accountants as oa
import pytest
import torch

from lightning_privacy.accountants import (
    ACCOUNTANTS,
    Accountant,
    BatchClippingAccountant,
    GaussianMechanismAccountant,
    GDPAccountant,
    PRVAccountant,
    RDPAccountant,
    create_accountant,
    list_accountants,
)
from lightning_privacy.functional.accounting import (
    batch_clipping_epsilon,
    dpsgd_epsilon,
    dpsgd_noise_multiplier,
)

# Per registered accountant: constructor arguments and one release for `step` (batch clipping
# counts epochs; the Opacus-backed ones steps of a subsampled Gaussian). Every registered
# accountant must have an entry: the contract test fails for one that does not.
ACCOUNTANT_TABLE = {
    "batch_clipping": (dict(max_grad_norm=1.0, std=4.0), dict(epochs=2)),
    "gdp": ({}, dict(noise_multiplier=1.0, sample_rate=0.01, steps=20)),
    "prv": ({}, dict(noise_multiplier=1.0, sample_rate=0.01, steps=20)),
    "rdp": ({}, dict(noise_multiplier=1.0, sample_rate=0.01, steps=20)),
}
OPACUS_BACKED = [
    n for n in ACCOUNTANTS if issubclass(ACCOUNTANTS.get(n), GaussianMechanismAccountant)
]
# GDP rejects a change of noise multiplier or sample rate: its history keeps them fixed
FIXED_MECHANISM = {"gdp"}


def _table_entry(name):
    if name not in ACCOUNTANT_TABLE:
        pytest.fail(
            f"The registered accountant {name!r} has no entry in ACCOUNTANT_TABLE: add its "
            "constructor arguments and a release."
        )
    return ACCOUNTANT_TABLE[name]


@pytest.mark.parametrize("name", list_accountants())
def test_every_registered_accountant_keeps_the_interface_contract(name):
    """An Accountant named by its mechanism; ε = 0 before any release; epsilon_after looks
    ahead without recording; state_dict/load_state_dict round-trip ε."""
    init, release = _table_entry(name)
    delta = 1e-5
    acct = create_accountant(name, **init)
    assert isinstance(acct, Accountant) and type(acct) is ACCOUNTANTS.get(name)
    assert acct.mechanism == name
    assert acct.get_epsilon(delta) == 0.0
    empty = acct.state_dict()
    ahead = acct.epsilon_after(delta, **release)
    assert ahead > 0
    assert acct.get_epsilon(delta) == 0.0 and acct.state_dict() == empty  # nothing recorded
    acct.step(**release)
    epsilon = acct.get_epsilon(delta)
    assert epsilon == pytest.approx(ahead, rel=1e-12)
    restored = create_accountant(name, **init)
    restored.load_state_dict(acct.state_dict())
    assert restored.get_epsilon(delta) == epsilon


@pytest.mark.parametrize("name", OPACUS_BACKED)
def test_wrapper_matches_opacus_stepwise(name):
    ours = create_accountant(name)
    theirs = oa.create_accountant(name)
    schedule = [(1.1, 0.02, 30), (0.8, 0.05, 7)]
    if name in FIXED_MECHANISM:
        schedule = [(1.1, 0.02, 30), (1.1, 0.02, 7)]
    for z, q, n in schedule:
        ours.step(noise_multiplier=z, sample_rate=q, steps=n)
        for _ in range(n):
            theirs.step(noise_multiplier=z, sample_rate=q)
    assert ours.steps == 37
    assert ours.history == theirs.history
    assert abs(ours.get_epsilon(1e-5) - theirs.get_epsilon(1e-5)) <= 1e-9


def test_functional_matches_opacus():
    theirs = oa.RDPAccountant()
    for _ in range(250):
        theirs.step(noise_multiplier=1.3, sample_rate=64 / 1437)
    eps = dpsgd_epsilon(noise_multiplier=1.3, sample_rate=64 / 1437, steps=250, delta=1e-4)
    assert abs(eps - theirs.get_epsilon(1e-4)) <= 1e-9


def test_gdp_is_opacus_gaussian_and_rejects_changes():
    acct = GDPAccountant()
    assert isinstance(acct.opacus_accountant, oa.GaussianAccountant)
    acct.step(noise_multiplier=1.0, sample_rate=0.01, steps=10)
    with pytest.raises(ValueError):
        acct.step(noise_multiplier=2.0, sample_rate=0.01)


def test_noise_multiplier_reaches_target():
    z = dpsgd_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.05, steps=200)
    eps = dpsgd_epsilon(noise_multiplier=z, sample_rate=0.05, steps=200, delta=1e-5)
    assert 1.98 <= eps <= 2.0
    # a slightly smaller noise multiplier overshoots the target: the search is not just "big"
    eps_less = dpsgd_epsilon(noise_multiplier=0.95 * z, sample_rate=0.05, steps=200, delta=1e-5)
    assert eps_less > 2.0


def test_batch_clipping_uses_half_multiplier_without_amplification():
    acct = BatchClippingAccountant(max_grad_norm=0.5, std=3.0)
    assert acct.noise_multiplier == pytest.approx(3.0)  # std / (2C)
    acct.step(epochs=4)
    theirs = oa.RDPAccountant()
    for _ in range(4):
        theirs.step(noise_multiplier=3.0, sample_rate=1.0)
    assert abs(acct.get_epsilon(1e-5) - theirs.get_epsilon(1e-5)) <= 1e-9
    assert acct.get_epsilon(1e-5) == batch_clipping_epsilon(
        max_grad_norm=0.5, std=3.0, epochs=4, delta=1e-5
    )


def test_batch_clipping_composes_like_gaussians():
    # E Gaussian mechanisms with multiplier z compose to one with multiplier z / sqrt(E) exactly
    four = BatchClippingAccountant(max_grad_norm=1.0, std=8.0)
    four.step(epochs=4)
    one = BatchClippingAccountant(max_grad_norm=1.0, std=4.0)
    one.step()
    assert four.get_epsilon(1e-5) == pytest.approx(one.get_epsilon(1e-5), rel=1e-9)
    # and the sensitivity is 2C, not C: DP-SGD-style accounting with multiplier std/C is smaller
    naive = dpsgd_epsilon(noise_multiplier=8.0, sample_rate=1.0, steps=4, delta=1e-5)
    assert naive < four.get_epsilon(1e-5)


def test_batch_clipping_sensitivity_bound_holds():
    gen = torch.Generator().manual_seed(0)
    c = 1.0

    def clip(v):
        return v * min(1.0, c / float(v.norm()))

    worst = 0.0
    for _ in range(200):
        batch = torch.randn(8, 5, generator=gen) * 10
        other = batch.clone()
        other[3] = torch.randn(5, generator=gen) * 100
        worst = max(worst, float((clip(batch.mean(0)) - clip(other.mean(0))).norm()))
    assert 1.0 < worst <= 2 * c + 1e-6


def test_batch_clipping_state_roundtrip_and_mismatch():
    acct = BatchClippingAccountant(max_grad_norm=1.0, std=5.0)
    acct.step(epochs=2)
    restored = BatchClippingAccountant(max_grad_norm=1.0, std=5.0)
    restored.load_state_dict(acct.state_dict())
    assert restored.epochs == 2
    restored.step()
    acct.step()
    assert restored.get_epsilon(1e-5) == acct.get_epsilon(1e-5)
    with pytest.raises(ValueError, match="max_grad_norm"):
        BatchClippingAccountant(max_grad_norm=2.0, std=5.0).load_state_dict(acct.state_dict())


def test_opacus_state_roundtrip_and_wrong_mechanism():
    acct = RDPAccountant()
    acct.step(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    other = RDPAccountant()
    other.load_state_dict(acct.state_dict())
    assert other.get_epsilon(1e-5) == acct.get_epsilon(1e-5)
    with pytest.raises(ValueError, match="rdp"):
        PRVAccountant().load_state_dict(acct.state_dict())


def test_zero_steps_and_zero_noise():
    assert RDPAccountant().get_epsilon(1e-5) == 0.0
    acct = RDPAccountant()
    acct.step(noise_multiplier=0.0, sample_rate=0.1)
    assert math.isinf(acct.get_epsilon(1e-5))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(max_grad_norm=0.0, std=1.0), ValueError, "max_grad_norm"),
        (dict(max_grad_norm=1.0, std=-1.0), ValueError, "std"),
        (dict(max_grad_norm="1", std=1.0), TypeError, "max_grad_norm"),
    ],
)
def test_batch_clipping_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchClippingAccountant(**kwargs)


def test_bad_delta_steps_and_names():
    acct = BatchClippingAccountant(max_grad_norm=1.0, std=1.0)
    with pytest.raises(ValueError, match="delta"):
        acct.get_epsilon(1.0)
    with pytest.raises(ValueError, match="epochs"):
        acct.step(epochs=-1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        RDPAccountant().step(noise_multiplier=-1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="Did you mean 'prv'"):
        create_accountant("pvr")
    with pytest.raises(ValueError, match="accountant"):
        dpsgd_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=1, delta=1e-5, accountant="x")
    assert list_accountants() == ["batch_clipping", "gdp", "prv", "rdp"]
