import math

import pytest
import torch
from scipy import stats

from lightning_privacy.functional import (
    clip_by_global_norm,
    gaussian_noise,
    global_norm,
    laplace_noise,
    low_rank,
    magnitude_pruning,
    random_pruning,
)
from lightning_privacy.functional.defenses import (
    add_noise,
    gaussian_noise_sample,
    laplace_noise_sample,
)


def _grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(8, 3, 3, 3, generator=g),
        torch.randn(8, generator=g),
        torch.randn(10, 32, generator=g) * 0.001,
    ]


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


ALL = [
    lambda gs: gaussian_noise(gs, std=0.1, generator=_gen()),
    lambda gs: laplace_noise(gs, scale=0.1, generator=_gen()),
    lambda gs: clip_by_global_norm(gs, max_norm=0.5),
    lambda gs: magnitude_pruning(gs, ratio=0.7),
    lambda gs: magnitude_pruning(gs, ratio=0.7, scope="global"),
    lambda gs: random_pruning(gs, ratio=0.5, generator=_gen()),
    lambda gs: low_rank(gs, rank=2),
]


@pytest.mark.parametrize("fn", ALL)
def test_shapes_kept_and_inputs_untouched(fn):
    grads = _grads()
    before = [g.clone() for g in grads]
    out = fn(grads)
    assert [o.shape for o in out] == [g.shape for g in grads]
    assert [o.dtype for o in out] == [g.dtype for g in grads]
    for g, b in zip(grads, before, strict=True):
        assert torch.equal(g, b)
    assert any(not torch.equal(o, g) for o, g in zip(out, grads, strict=True))


def test_randomness_only_from_generator():
    grads = _grads()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = gaussian_noise(grads, std=1.0, generator=_gen(5))
    b = gaussian_noise(grads, std=1.0, generator=_gen(5))
    c = random_pruning(grads, ratio=0.3, generator=_gen(5))
    d = random_pruning(grads, ratio=0.3, generator=_gen(5))
    e = laplace_noise(grads, scale=1.0, generator=_gen(5))
    f = laplace_noise(grads, scale=1.0, generator=_gen(5))
    assert torch.equal(state, torch.get_rng_state())
    for x, y in [(a, b), (c, d), (e, f)]:
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))
    other = gaussian_noise(grads, std=1.0, generator=_gen(6))
    assert not torch.equal(a[0], other[0])


def test_zero_settings_are_exact_copies():
    grads = _grads()
    gen = _gen()
    state = gen.get_state()
    for out in (
        gaussian_noise(grads, std=0.0, generator=gen),
        laplace_noise(grads, scale=0.0, generator=gen),
        random_pruning(grads, ratio=0.0, generator=gen),
        magnitude_pruning(grads, ratio=0.0),
    ):
        for o, g in zip(out, grads, strict=True):
            assert torch.equal(o, g) and o.data_ptr() != g.data_ptr()
    assert torch.equal(state, gen.get_state())


def test_noise_statistics():
    zeros = [torch.zeros(200_000)]
    noise = gaussian_noise(zeros, std=0.3, generator=_gen())[0]
    assert abs(noise.mean().item()) < 0.005
    assert noise.std().item() == pytest.approx(0.3, rel=0.01)
    lap = laplace_noise(zeros, scale=0.3, generator=_gen())[0]
    assert lap.var().item() == pytest.approx(2 * 0.3**2, rel=0.03)
    # Laplace: E|x| = b, symmetric, and the whole distribution (KS against Laplace(0, b))
    assert lap.abs().mean().item() == pytest.approx(0.3, rel=0.02)
    assert (lap > 0).double().mean().item() == pytest.approx(0.5, abs=0.005)
    assert stats.kstest(lap[:20_000].double().numpy(), "laplace", args=(0, 0.3)).pvalue > 0.01
    wrong = stats.kstest(lap[:20_000].double().numpy(), "laplace", args=(0, 0.36)).pvalue
    assert wrong < 1e-6  # the test can tell a 20 % wrong scale


def test_samplers_are_the_noise_the_noisy_copies_add():
    grads = _grads()
    for noisy, sample in (
        (gaussian_noise(grads, std=0.2, generator=_gen(3)), gaussian_noise_sample),
        (laplace_noise(grads, scale=0.2, generator=_gen(3)), laplace_noise_sample),
    ):
        key = "std" if sample is gaussian_noise_sample else "scale"
        noise = sample(grads, **{key: 0.2}, generator=_gen(3))
        assert all(torch.equal(o, n + g) for o, n, g in zip(noisy, noise, grads, strict=True))
    assert gaussian_noise_sample(grads, std=0.0) is None
    assert laplace_noise_sample(grads, scale=0.0) is None
    with pytest.raises(ValueError, match="one noise tensor per gradient"):
        add_noise(grads, [torch.zeros(1)])


def test_noise_keeps_low_precision_dtype():
    g = [torch.zeros(100, dtype=torch.bfloat16)]
    out = gaussian_noise(g, std=1.0, generator=_gen())
    assert out[0].dtype == torch.bfloat16 and out[0].abs().sum() > 0


def test_clip_by_global_norm():
    grads = _grads()
    norm = global_norm(grads).item()
    expected = math.sqrt(sum(g.square().sum().item() for g in grads))
    assert norm == pytest.approx(expected, rel=1e-5)
    out = clip_by_global_norm(grads, max_norm=1.0)
    assert global_norm(out).item() == pytest.approx(1.0, rel=1e-5)
    assert global_norm(out).item() <= 1.0
    factor = out[0].flatten()[0] / grads[0].flatten()[0]
    for o, g in zip(out, grads, strict=True):  # one common factor: direction kept
        torch.testing.assert_close(o, g * factor)
    unclipped = clip_by_global_norm(grads, max_norm=10 * norm)
    for o, g in zip(unclipped, grads, strict=True):
        torch.testing.assert_close(o, g)


def test_magnitude_pruning_per_tensor_keeps_largest():
    grads = _grads()
    out = magnitude_pruning(grads, ratio=0.75)
    for o, g in zip(out, grads, strict=True):
        n_pruned = math.floor(0.75 * g.numel())
        assert (o == 0).sum().item() == n_pruned
        kept = o != 0
        assert torch.equal(o[kept], g[kept])
        assert g[kept].abs().min() >= g[~kept].abs().max()


def test_magnitude_pruning_global_is_one_topk():
    grads = _grads()  # the third tensor is 100x smaller
    out = magnitude_pruning(grads, ratio=0.6, scope="global")
    flat_g = torch.cat([g.flatten() for g in grads])
    flat_o = torch.cat([o.flatten() for o in out])
    assert (flat_o == 0).sum().item() == int(0.6 * flat_g.numel())
    kept = flat_o != 0
    assert flat_g[kept].abs().min() >= flat_g[~kept].abs().max()
    assert (out[2] == 0).all()  # small tensor wiped out globally, not per tensor
    assert (magnitude_pruning(grads, ratio=0.6)[2] != 0).any()


def test_random_pruning_fraction():
    out = random_pruning([torch.ones(100_000)], ratio=0.6, generator=_gen())[0]
    assert (out == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)
    assert set(out.unique().tolist()) == {0.0, 1.0}


def test_low_rank():
    g = _gen()
    conv = torch.randn(16, 4, 3, 3, generator=g)
    bias = torch.randn(16, generator=g)
    out = low_rank([conv, bias], rank=3)
    assert torch.linalg.matrix_rank(out[0].reshape(16, -1)).item() == 3
    assert torch.equal(out[1], bias)  # 1-D left as is
    u, s, vh = torch.linalg.svd(conv.reshape(16, -1), full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(out[0].reshape(16, -1), best)
    small = torch.randn(2, 5, generator=g)
    assert torch.equal(low_rank([small], rank=2)[0], small)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: gaussian_noise([torch.zeros(1)], std=-1.0), ValueError, "`std`.*>= 0.0"),
        (lambda: gaussian_noise([torch.zeros(1)], std=float("nan")), ValueError, "finite"),
        (lambda: gaussian_noise([torch.zeros(1)], std="0.1"), TypeError, "`std`"),
        (lambda: laplace_noise([torch.zeros(1)], scale=-0.1), ValueError, "`scale`"),
        (lambda: clip_by_global_norm([torch.zeros(1)], max_norm=0.0), ValueError, "> 0.0"),
        (lambda: magnitude_pruning([torch.zeros(1)], ratio=1.0), ValueError, "< 1.0"),
        (lambda: magnitude_pruning([torch.zeros(1)], ratio=-0.1), ValueError, ">= 0.0"),
        (
            lambda: magnitude_pruning([torch.zeros(1)], ratio=0.5, scope="layer"),
            ValueError,
            "scope",
        ),
        (lambda: random_pruning([torch.zeros(1)], ratio=1.5), ValueError, "`ratio`"),
        (lambda: low_rank([torch.zeros(2, 2)], rank=0), ValueError, "`rank`.*>= 1"),
        (lambda: low_rank([torch.zeros(2, 2)], rank=1.5), TypeError, "`rank`"),
        (lambda: gaussian_noise(torch.zeros(3), std=0.1), TypeError, "sequence of tensors"),
        (lambda: gaussian_noise([1.0], std=0.1), TypeError, r"grads\[0\]"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("kind", ["normal", "sparse", "ties"])
def test_kth_largest_matches_topk_on_large_inputs(kind):
    from lightning_privacy.functional.defenses import kth_largest

    g = _gen(3)
    values = torch.randn(300_000, generator=g).abs()
    if kind == "sparse":  # mostly exact zeros, as dead ReLU units give
        values[torch.rand(300_000, generator=g) < 0.8] = 0.0
    if kind == "ties":
        values = torch.randint(0, 50, (300_000,), generator=g).float()
    for k in (1, 17, 30_000, 150_000, 299_999, 300_000):
        expected = torch.topk(values, k).values.min()
        assert kth_largest(values, k) == expected, (kind, k)


def test_magnitude_pruning_large_tensor_equals_topk_mask():
    g = torch.randn(512, 300, generator=_gen(4))
    out = magnitude_pruning([g], ratio=0.9)[0]
    keep = g.numel() - math.floor(0.9 * g.numel())
    idx = torch.topk(g.abs().flatten(), keep).indices
    ref = torch.zeros_like(g).flatten()
    ref[idx] = g.flatten()[idx]
    assert torch.equal(out, ref.view_as(g))


@pytest.mark.parametrize("shape", [(40, 5), (6, 50), (12, 4, 3, 3)])
def test_low_rank_equals_truncated_svd(shape):
    g = torch.randn(*shape, generator=_gen(5))
    out = low_rank([g], rank=2)[0]
    u, s, vh = torch.linalg.svd(g.reshape(shape[0], -1).double(), full_matrices=False)
    best = ((u[:, :2] * s[:2]) @ vh[:2]).float().reshape(shape)
    torch.testing.assert_close(out, best, rtol=1e-4, atol=1e-5)
