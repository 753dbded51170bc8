"""The sigmoid LeNet of Deep Leakage from Gradients (Zhu et al., NeurIPS 2019).

Three 5x5 convolutions with sigmoid activations (no pooling) and one linear head. Sigmoid keeps
the network twice differentiable everywhere, which gradient-matching attacks need.

Example:
    >>> import torch
    >>> model = LeNetDLG(num_classes=10, channels=1, image_size=32)
    >>> model(torch.rand(2, 1, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_privacy._validation import check_choice, check_int

INITS = ("uniform", "normal", "kaiming", "xavier", "default")


def init_weights(
    model: nn.Module, init: str = "uniform", *, generator: torch.Generator | None = None
) -> None:
    """Re-initialise conv and linear layers in place.

    Args:
        model: The module.
        init: ``"uniform"`` (U(-0.5, 0.5) on weights and biases, the DLG setting), ``"normal"``
            (N(0, 0.1^2)), ``"kaiming"``, ``"xavier"`` or ``"default"`` (PyTorch's).
        generator: Optional generator for reproducible weights.

    Example:
        >>> m = torch.nn.Linear(3, 3)
        >>> init_weights(m, "uniform")
        >>> bool(m.weight.abs().max() <= 0.5)
        True
    """
    check_choice("init", init, INITS)
    if init == "default":
        return
    for module in model.modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        weight, bias = module.weight, module.bias
        with torch.no_grad():
            if init == "uniform":
                weight.uniform_(-0.5, 0.5, generator=generator)
            elif init == "normal":
                weight.normal_(0.0, 0.1, generator=generator)
            elif init == "kaiming":
                nn.init.kaiming_normal_(weight, generator=generator)
            else:
                nn.init.xavier_uniform_(weight, generator=generator)
            if bias is not None:
                if init == "uniform":
                    bias.uniform_(-0.5, 0.5, generator=generator)
                else:
                    bias.zero_()


class LeNetDLG(nn.Module):
    """DLG's LeNet: conv(5, stride 2) -> conv(5, stride 2) -> conv(5, stride 1), sigmoid, linear.

    Args:
        num_classes: Output classes.
        channels: Input channels.
        image_size: Input side (divisible by 4).
        init: Weight initialisation, see :func:`init_weights` (``"uniform"`` is DLG's).
        width: Channels of each convolution (12 in the paper).
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: int = 3,
        image_size: int = 32,
        init: str = "uniform",
        width: int = 12,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, low=1)
        check_int("image_size", image_size, low=4)
        if image_size % 4:
            raise ValueError(
                f"Expected `image_size` to be divisible by 4, but got {image_size} (int)."
            )
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        self.fc = nn.Linear(width * (image_size // 4) ** 2, num_classes)
        init_weights(self, init)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of images."""
        return self.fc(self.features(x).flatten(1))
