"""Every registered attack keeps the interface: a frozen dataclass with a modality whose
``reconstruct`` runs on a tiny model and returns a ``Reconstruction`` of the right shape,
reproducible from its generator, without touching the model or the global random stream."""

import dataclasses

import pytest
import torch
from helpers import SIGMOID_MLP, BoringModel, random_tensors

from lightning_privacy.attacks import ATTACKS, Attack, Reconstruction, create_attack, list_attacks
from lightning_privacy.functional import parameter_gradients
from lightning_privacy.functional.attacks import observed_gradients_of
from lightning_privacy.models import TinyTransformerLM

# settings that make each registered attack finish within a few iterations (every registered
# attack needs an entry: the contract test fails for one that has none)
QUICK = {
    "analytic_linear": {},
    "analytic_patch_embedding": {},
    "deep_leakage": dict(max_iterations=2, restarts=1),
    "idlg": dict(max_iterations=2, restarts=1),
    "inverting_gradients": dict(max_iterations=2),
    "token_leakage": {},
}
NUM_SAMPLES = 2
VOCAB = 40


def image_victim():
    """A sigmoid MLP (first layer linear with bias) and the gradient of two 1x4x4 inputs."""
    model = BoringModel(**dict(SIGMOID_MLP, batch_norm=False, dropout=0.0))
    x, y = random_tensors(NUM_SAMPLES, (1, 4, 4), num_classes=3, seed=1)
    return model, observed_gradients_of(model, x, y), (1, 4, 4)


def text_victim():
    """A one-layer language model and the gradient of two 6-token sequences."""
    torch.manual_seed(0)
    lm = TinyTransformerLM(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_len=6)
    tokens = torch.randint(0, VOCAB, (NUM_SAMPLES, 6), generator=torch.Generator().manual_seed(1))
    return lm, parameter_gradients(lm, tokens, tokens, loss_fn=lm.loss_fn), (6,)


def vit_victim():
    """A one-block timm ViT (linear patch embedding, learned positions) and one 3x8x8 input."""
    import timm

    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(
        img_size=8, patch_size=4, num_classes=3, embed_dim=16, depth=1, num_heads=2
    ).eval()
    x, y = random_tensors(1, (3, 8, 8), num_classes=3, seed=1)
    return vit, observed_gradients_of(vit, x, y), (3, 8, 8)


VICTIMS = {"image": image_victim, "text": text_victim}
#: Attacks whose threat model needs another victim: (victim, batch size).
OWN_VICTIMS = {"analytic_patch_embedding": (vit_victim, 1)}


@pytest.mark.parametrize("name", list_attacks())
def test_every_registered_attack_keeps_the_interface_contract(name):
    if name not in QUICK:
        pytest.fail(f"The registered attack {name!r} has no entry in QUICK: add quick settings.")
    cls = ATTACKS.get(name)
    attack = create_attack(name, **QUICK[name])
    assert isinstance(attack, Attack) and type(attack) is cls
    assert dataclasses.is_dataclass(attack) and cls.__dataclass_params__.frozen
    assert cls.modality in VICTIMS, f"{name}: unknown modality {cls.modality!r}"
    victim, num_samples = OWN_VICTIMS.get(name, (VICTIMS[cls.modality], NUM_SAMPLES))
    model, gradients, input_shape = victim()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()

    def run():
        return attack.reconstruct(
            model,
            gradients,
            input_shape=input_shape,
            num_samples=num_samples,
            generator=torch.Generator().manual_seed(0),
        )

    rec, again = run(), run()
    assert torch.equal(torch.get_rng_state(), state)  # randomness from the generator only
    assert isinstance(rec, Reconstruction)
    if cls.modality == "image":
        assert rec.inputs.shape == (num_samples, *input_shape) and rec.inputs.is_floating_point()
        assert torch.isfinite(rec.inputs).all()
    else:  # the recovered token ids, sorted
        assert rec.inputs.ndim == 1 and rec.inputs.dtype == torch.int64
        assert int(rec.inputs.min()) >= 0 and int(rec.inputs.max()) < VOCAB
    if rec.labels is not None:
        assert rec.labels.shape == (num_samples,) and rec.labels.dtype == torch.int64
    assert torch.equal(rec.inputs, again.inputs)  # same generator seed, same reconstruction
    # the model is read, never written: no .grad, same weights and BatchNorm buffers
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
