from __future__ import annotations

import pytest
import torch

from lightning_privacy.models.timm_models import ARCHITECTURES, build_timm_model, layer_groups


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_builds_at_32px_and_groups_partition_parameters(name):
    model = build_timm_model(name, num_classes=4)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 4)  # batch 1 in train mode works
    groups = layer_groups(model)
    flat = [n for names in groups.values() for n in names]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters())
    assert len(flat) == len(set(flat))
    assert groups["head"] and groups["stem"] and groups["norm"]


def test_groups_by_architecture():
    resnet = layer_groups(build_timm_model("resnet18"))
    assert "layer1.0.downsample.1.weight" not in resnet["conv"]
    assert "layer2.0.downsample.1.weight" in resnet["norm"]
    assert "layer2.0.downsample.0.weight" in resnet["conv"]
    vit = layer_groups(build_timm_model("vit_tiny"))
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(vit["stem"])
    assert "blocks.3.attn.qkv.weight" in vit["attention"]
    assert "blocks.3.mlp.fc1.weight" in vit["mlp"] and "norm.weight" in vit["norm"]
    convnext = layer_groups(build_timm_model("convnext_atto"))
    assert "stages.1.downsample.1.weight" in convnext["conv"]
    assert "stages.1.downsample.0.weight" in convnext["norm"]
    assert "head.norm.weight" in convnext["norm"] and convnext["head"] == [
        "head.fc.weight",
        "head.fc.bias",
    ]


def test_unknown_architecture():
    with pytest.raises(ValueError, match="Expected `name` to be one of"):
        build_timm_model("vit_huge")
