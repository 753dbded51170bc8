import dataclasses

import pytest
import torch

from lightning_privacy.defenses import (
    DEFENSES,
    AdditiveNoise,
    GaussianNoise,
    GradientClipping,
    GradientTransform,
    LaplaceNoise,
    LowRankFiltering,
    MagnitudePruning,
    RandomPruning,
    apply_transforms,
    create_defense,
    draw_noise,
    list_defenses,
)
from lightning_privacy.functional import (
    clip_by_global_norm,
    gaussian_noise,
    low_rank,
    magnitude_pruning,
)

NAMES = {
    "gaussian_noise": (GaussianNoise, {"std": 0.1}),
    "laplace_noise": (LaplaceNoise, {"scale": 0.1}),
    "gradient_clipping": (GradientClipping, {"max_norm": 1.0}),
    "magnitude_pruning": (MagnitudePruning, {"ratio": 0.5}),
    "random_pruning": (RandomPruning, {"ratio": 0.5}),
    "low_rank": (LowRankFiltering, {"rank": 1}),
}


def _entry(name):
    """The class and example settings of a registered defense (every one needs an entry)."""
    if name not in NAMES:
        pytest.fail(
            f"The registered defense {name!r} has no entry in NAMES: add its class and settings."
        )
    return NAMES[name]


def test_registry_names_and_classes():
    assert list_defenses() == sorted(NAMES)
    for name in DEFENSES:
        cls, kwargs = _entry(name)
        obj = create_defense(name, **kwargs)
        assert type(obj) is cls and isinstance(obj, GradientTransform)
        assert obj.provides_formal_dp is False


def _gradients():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(6, 5, generator=g),
        torch.randn(5, generator=g),
        torch.randn(2, 3, 3, generator=g),
    ]


@pytest.mark.parametrize("name", list_defenses())
def test_every_registered_defense_keeps_the_interface_contract(name):
    """A frozen dataclass with a `strength` field; new tensors of the input shapes, the input left
    alone; randomness from the `generator` only, and drawn from it exactly when it says so."""
    cls, kwargs = _entry(name)
    assert DEFENSES.get(name) is cls
    defense = create_defense(name, **kwargs)
    assert isinstance(defense, GradientTransform)
    assert dataclasses.is_dataclass(defense) and cls.__dataclass_params__.frozen
    fields = {f.name for f in dataclasses.fields(defense)}
    assert cls.strength in fields and "strength" not in fields  # a ClassVar naming a field
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(defense, cls.strength, getattr(defense, cls.strength))

    grads = _gradients()
    before = [g.clone() for g in grads]
    global_state = torch.get_rng_state()
    generator = torch.Generator().manual_seed(3)
    generator_state = generator.get_state()
    out = defense(grads, generator=generator)
    again = defense(grads, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), global_state)  # the global stream is untouched
    assert cls.uses_randomness == (not torch.equal(generator.get_state(), generator_state))
    assert isinstance(out, list) and len(out) == len(grads)
    for o, a, g, b in zip(out, again, grads, before, strict=True):
        assert isinstance(o, torch.Tensor) and o.shape == g.shape and o.dtype == g.dtype
        assert o.data_ptr() != g.data_ptr()  # a copy, not a view of the input
        assert torch.equal(g, b)  # the input is not mutated
        assert torch.equal(o, a)  # same generator seed, same output


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="Did you mean 'magnitude_pruning'"):
        create_defense("magnitude_prunning", ratio=0.5)


def test_frozen_and_keyword_only():
    noise = GaussianNoise(std=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        noise.std = 0.2  # type: ignore[misc]
    with pytest.raises(TypeError):
        GaussianNoise(0.1)  # type: ignore[misc]
    assert GaussianNoise(std=1) == GaussianNoise(std=1.0)
    assert isinstance(GaussianNoise(std=1).std, float)


def test_global_view_flags():
    assert GradientClipping(max_norm=1.0).needs_global_view
    assert MagnitudePruning(ratio=0.5, scope="global").needs_global_view
    assert not MagnitudePruning(ratio=0.5).needs_global_view
    for t in (GaussianNoise(std=1.0), LaplaceNoise(scale=1.0), RandomPruning(ratio=0.1)):
        assert not t.needs_global_view
    assert not LowRankFiltering(rank=2).needs_global_view


def test_components_match_functions():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, 5, generator=g), torch.randn(5, generator=g)]
    pipe = [
        GradientClipping(max_norm=0.5),
        MagnitudePruning(ratio=0.5, scope="global"),
        LowRankFiltering(rank=2),
        GaussianNoise(std=0.01),
    ]
    out = apply_transforms(pipe, grads, generator=torch.Generator().manual_seed(3))
    ref = clip_by_global_norm(grads, max_norm=0.5)
    ref = magnitude_pruning(ref, ratio=0.5, scope="global")
    ref = low_rank(ref, rank=2)
    ref = gaussian_noise(ref, std=0.01, generator=torch.Generator().manual_seed(3))
    for o, r in zip(out, ref, strict=True):
        assert torch.equal(o, r)


@pytest.mark.parametrize(
    ("build", "exc", "match"),
    [
        (
            lambda: GaussianNoise(std=-1),
            ValueError,
            r"Expected `std` to be a finite float >= 0.0, but got -1 \(int\)",
        ),
        (lambda: GaussianNoise(std=float("nan")), ValueError, "`std`"),
        (lambda: GaussianNoise(std=None), TypeError, "`std`"),
        (lambda: LaplaceNoise(scale=float("inf")), ValueError, "`scale`"),
        (lambda: GradientClipping(max_norm=0), ValueError, "`max_norm`"),
        (lambda: MagnitudePruning(ratio=1.0), ValueError, "`ratio`"),
        (lambda: MagnitudePruning(ratio=0.5, scope="all"), ValueError, "`scope`"),
        (lambda: RandomPruning(ratio=-0.01), ValueError, "`ratio`"),
        (lambda: LowRankFiltering(rank=0), ValueError, "`rank`"),
        (lambda: LowRankFiltering(rank=2.0), TypeError, "`rank`"),
    ],
)
def test_bad_settings(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


@pytest.mark.parametrize(
    "pipeline",
    [
        [GaussianNoise(std=0.1)],
        [LaplaceNoise(scale=0.1)],
        [GradientClipping(max_norm=0.5), GaussianNoise(std=0.1)],
        [GaussianNoise(std=0.1), MagnitudePruning(ratio=0.5), LaplaceNoise(scale=0.2)],
        [GaussianNoise(std=0.0)],
    ],
    ids=lambda p: "+".join(type(t).__name__ for t in p),
)
def test_noise_drawn_ahead_gives_bitwise_the_same_pipeline(pipeline):
    grads = [torch.randn(4, 3), torch.randn(5)]
    noise = draw_noise(pipeline, grads, generator=torch.Generator().manual_seed(9))
    assert noise is not None and set(noise) == {
        i for i, t in enumerate(pipeline) if isinstance(t, AdditiveNoise)
    }
    early = apply_transforms(pipeline, grads, noise=noise)
    now = apply_transforms(pipeline, grads, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(a, b) for a, b in zip(early, now, strict=True))


def test_noise_is_not_drawn_ahead_when_other_randomness_or_none():
    grads = [torch.randn(3)]
    assert draw_noise([GaussianNoise(std=0.1), RandomPruning(ratio=0.5)], grads) is None
    assert draw_noise([GradientClipping(max_norm=1.0), LowRankFiltering(rank=1)], grads) is None
