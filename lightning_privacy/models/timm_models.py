"""timm architectures at 32 px (``pretrained=False``) and their parameter layer groups.

For the architecture audit (does a transformer leak more than a CNN, does the stem leak most?)
three timm families are built at the same input size, with nothing downloaded:

* ``"resnet18"``: timm's ResNet-18 with a CIFAR stem (3x3 stride-1 ``conv1``, no max-pool), so
  the last stage still sees 4x4 maps at 32 px;
* ``"vit_tiny"``: timm's ViT-Tiny (width 192, 3 heads) at ``img_size=32``, ``patch_size=4``
  (64 tokens), 6 blocks instead of 12;
* ``"convnext_atto"``: timm's ConvNeXt-Atto with a 2x2 patchify stem (16x16 after the stem).

:func:`layer_groups` splits the trainable parameters into ``stem``, ``attention``, ``mlp``,
``norm``, ``head``, ``conv`` (other convolutions) and ``other`` (ConvNeXt layer scales), so an
attacker that sees only one group's gradient can be simulated.

Example:
    >>> model = build_timm_model("vit_tiny", num_classes=10)
    >>> groups = layer_groups(model)
    >>> sorted(k for k, v in groups.items() if v)
    ['attention', 'head', 'mlp', 'norm', 'stem']
    >>> groups["head"]
    ['head.weight', 'head.bias']
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_privacy._validation import check_choice, check_int

ARCHITECTURES = ("resnet18", "vit_tiny", "convnext_atto")
#: Layer groups, in the order they are assigned (a parameter goes to the first that claims it).
GROUPS = ("head", "stem", "attention", "mlp", "norm", "conv", "other")
_STEM_PREFIXES = ("conv1.", "bn1.", "stem.", "patch_embed.", "cls_token", "pos_embed", "reg_token")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def build_timm_model(
    name: str, *, num_classes: int = 10, in_chans: int = 3, image_size: int = 32
) -> nn.Module:
    """Build one of :data:`ARCHITECTURES` with timm, randomly initialised.

    Args:
        name: ``"resnet18"``, ``"vit_tiny"`` or ``"convnext_atto"``.
        num_classes: Output classes.
        in_chans: Input channels.
        image_size: Side of the square input (the ViT's position embedding depends on it).

    Example:
        >>> import torch
        >>> build_timm_model("convnext_atto", num_classes=3)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3])
    """
    import timm

    check_choice("name", name, ARCHITECTURES)
    check_int("num_classes", num_classes, low=1)
    check_int("in_chans", in_chans, low=1)
    check_int("image_size", image_size, low=8)
    common: dict[str, Any] = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans}
    if name == "resnet18":
        model = timm.create_model("resnet18", **common)
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    if name == "vit_tiny":
        model = timm.create_model(
            "vit_tiny_patch16_224", img_size=image_size, patch_size=4, depth=6, **common
        )
        # The fused CPU attention kernel has no forward-mode derivative, which gradient-inversion
        # attacks need; timm's explicit softmax attention computes the same function.
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                setattr(module, "fused_attn", False)  # noqa: B010 - not a declared attribute
        return model
    return timm.create_model("convnext_atto", patch_size=2, **common)


def _group_of(name: str, module: nn.Module, head_names: set[str]) -> str:
    if name in head_names:
        return "head"
    if name.startswith(_STEM_PREFIXES):
        return "stem"
    if ".attn." in f".{name}":
        return "attention"
    if ".mlp." in f".{name}":
        return "mlp"
    if isinstance(module, _NORMS):
        return "norm"
    if isinstance(module, nn.Conv2d):
        return "conv"
    return "other"


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """Trainable parameter names of a timm model by layer group (every group key present).

    The ``head`` is the classifier (``model.get_classifier()`` when timm provides it); the
    ``stem`` is everything before the first stage (patch/position embeddings for a ViT); norm
    layers inside the stem or the head stay there. Each parameter is in exactly one group.

    Example:
        >>> groups = layer_groups(build_timm_model("resnet18"))
        >>> groups["stem"], groups["head"], groups["attention"]
        (['conv1.weight', 'bn1.weight', 'bn1.bias'], ['fc.weight', 'fc.bias'], [])
    """
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    head_ids = (
        {id(p) for p in classifier.parameters()} if isinstance(classifier, nn.Module) else set()
    )
    head_names = {n for n, p in model.named_parameters() if id(p) in head_ids}
    owner: dict[str, nn.Module] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owner[f"{module_name}.{param_name}" if module_name else param_name] = module
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[_group_of(name, owner.get(name, model), head_names)].append(name)
    return groups
