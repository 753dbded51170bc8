"""A CIFAR-style ResNet-18: 3x3 stem without max-pooling, for 32 px images.

Example:
    >>> import torch
    >>> model = resnet18_cifar(num_classes=10, channels=3)
    >>> model(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from torch import nn

from lightning_privacy._validation import check_choice


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(min(32, channels), channels)


def resnet18_cifar(num_classes: int = 10, channels: int = 3, norm: str = "batch") -> nn.Module:
    """Torchvision's ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool).

    Args:
        num_classes: Output classes.
        channels: Input channels.
        norm: ``"batch"`` (BatchNorm) or ``"group"`` (GroupNorm, which Opacus supports).

    Example:
        >>> m = resnet18_cifar(norm="group")
        >>> any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
        False
    """
    from torchvision.models import resnet18

    check_choice("norm", norm, ("batch", "group"))
    norm_layer = nn.BatchNorm2d if norm == "batch" else _group_norm
    model = resnet18(num_classes=num_classes, norm_layer=norm_layer)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
