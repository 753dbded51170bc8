"""The stem of a ViT carries its input: exact recovery from the patch and position embeddings'
gradients alone (``analytic_patch_embedding``), and clear refusals where the structure differs."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio

from lightning_privacy.attacks import AnalyticPatchEmbedding, create_attack
from lightning_privacy.data import load_photo_patches
from lightning_privacy.functional.gradients import parameter_gradients
from lightning_privacy.models.timm_models import build_timm_model, layer_groups


def stem_gradient(model, x, y):
    grads = parameter_gradients(model, x, y, loss_fn=F.cross_entropy)
    return {name: grads[name] for name in layer_groups(model)["stem"]}


def test_issue16_a_stem_only_attack_recovers_the_photo_from_vit_tiny_above_30_db():
    torch.manual_seed(0)
    vit = build_timm_model("vit_tiny", num_classes=6).eval()  # patch 4: 64 patches, width 192
    images, labels = load_photo_patches(image_size=32, channels=3)
    x, y = images[:1], labels[:1]
    stem = stem_gradient(vit, x, y)
    assert set(stem) == {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    }
    rec = create_attack("analytic_patch_embedding").reconstruct(
        vit, stem, input_shape=(3, 32, 32), num_samples=1
    )
    psnr = float(peak_signal_noise_ratio(rec.inputs.clamp(0, 1), x, data_range=1.0))
    assert psnr >= 30.0, psnr
    assert rec.metadata["token_rank"] == 64 and rec.metadata["prefix_tokens"] == 1
    assert rec.labels is None  # the head's gradient was not observed


def test_a_vit_without_class_token_and_with_positions_for_patches_only():
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(
        img_size=16,
        patch_size=4,
        num_classes=3,
        embed_dim=32,
        depth=1,
        num_heads=2,
        class_token=False,
        global_pool="avg",
        no_embed_class=True,
    ).eval()
    x, y = torch.rand(1, 3, 16, 16), torch.tensor([1])
    rec = AnalyticPatchEmbedding().reconstruct(
        vit, stem_gradient(vit, x, y), input_shape=(3, 16, 16), num_samples=1, labels=y
    )
    torch.testing.assert_close(rec.inputs, x, atol=1e-3, rtol=0)  # float32 gradients
    assert rec.metadata["prefix_tokens"] == 0 and rec.labels.tolist() == [1]


class NormalisedTokens(nn.Module):
    """Tokens normalised *before* the position embedding: its gradient is not the tokens'."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 16) * 0.02)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        tokens = self.norm(self.proj(x).flatten(2).transpose(1, 2)) + self.pos_embed
        return self.head(tokens.tanh().mean(1))


def test_refusals_name_the_problem():
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(
        img_size=8, patch_size=4, num_classes=3, embed_dim=16, depth=1, num_heads=2
    ).eval()
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    attack = AnalyticPatchEmbedding()
    with pytest.raises(ValueError, match=r"`num_samples` = 1.*but got 2"):
        attack.reconstruct(vit, stem_gradient(vit, x, y), input_shape=(3, 8, 8), num_samples=2)
    weights_only = {
        "patch_embed.proj.weight": stem_gradient(vit, x[:1], y[:1])["patch_embed.proj.weight"]
    }
    with pytest.raises(ValueError, match="position embedding of shape \\(1, tokens, 16\\)"):
        attack.reconstruct(vit, weights_only, input_shape=(3, 8, 8), num_samples=1)
    with pytest.raises(ValueError, match="multiples of the patch size 4x4, but got \\(3, 9, 9\\)"):
        attack.reconstruct(
            vit, stem_gradient(vit, x[:1], y[:1]), input_shape=(3, 9, 9), num_samples=1
        )
    model = NormalisedTokens()
    grads = parameter_gradients(model, x[:1], y[:1], loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="transformed in between"):
        attack.reconstruct(model, grads, input_shape=(3, 8, 8), num_samples=1)
    with pytest.raises(ValueError, match="linear patch embedding"):
        attack.reconstruct(
            nn.Sequential(nn.Flatten(), nn.Linear(192, 3)), {}, input_shape=(3, 8, 8), num_samples=1
        )


def test_a_non_square_image_and_a_defended_gradient():
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(
        img_size=(8, 16), patch_size=4, num_classes=3, embed_dim=16, depth=1, num_heads=2
    ).eval()
    x, y = torch.rand(1, 3, 8, 16), torch.tensor([2])
    stem = stem_gradient(vit, x, y)
    rec = AnalyticPatchEmbedding().reconstruct(vit, stem, input_shape=(3, 8, 16), num_samples=1)
    torch.testing.assert_close(rec.inputs, x, atol=1e-3, rtol=0)  # rows and columns in place
    noisy = {
        n: g + 1e-4 * torch.randn(g.shape, generator=torch.Generator().manual_seed(1))
        for n, g in stem.items()
    }
    with pytest.raises(ValueError, match="pass `tol=None`"):
        AnalyticPatchEmbedding().reconstruct(vit, noisy, input_shape=(3, 8, 16), num_samples=1)
    defended = AnalyticPatchEmbedding(tol=None).reconstruct(
        vit, noisy, input_shape=(3, 8, 16), num_samples=1
    )
    error = float((defended.inputs - x).abs().max())
    assert 1e-4 < error < 1.0  # perturbed by the noise, still an image of the input's scale


def test_an_input_shape_the_model_was_not_built_for_is_named():
    torch.manual_seed(0)
    vit = build_timm_model("vit_tiny", num_classes=6).eval()  # 32 px: 64 patches + class token
    x, y = torch.rand(1, 3, 32, 32), torch.tensor([0])
    with pytest.raises(ValueError, match=r"1 prefix token\(s\), but got \(3, 16, 16\)"):
        AnalyticPatchEmbedding().reconstruct(
            vit, stem_gradient(vit, x, y), input_shape=(3, 16, 16), num_samples=1
        )
