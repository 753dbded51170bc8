"""The observers and defenses on modules the library did not write, as a new user tries them.

Each case is a user-written ``LightningModule`` around a model family users train: torchvision's
ResNet-18, timm's ViT-Tiny (fused attention, timm's default) and ConvNeXt-Atto, Lightning's own
demo Transformer, a dict-batch module, a Hugging Face-style module and a classifier trained with
label smoothing. Each fits 2 steps with ``GradientDefense`` + ``InversionAudit`` +
``LeakageMonitor`` and must log the attack and leakage metrics without a failure.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_privacy import ModelAdapter
from lightning_privacy.adapters import AdaptedModel, lightning_demo_transformer, resolve_adapter
from lightning_privacy.attacks import InvertingGradients, TokenLeakage
from lightning_privacy.callbacks import DPSGD, GradientDefense, InversionAudit, LeakageMonitor
from lightning_privacy.defenses import GaussianNoise
from lightning_privacy.functional.gradients import differentiable_attention, parameter_gradients

QUICK_IG = InvertingGradients(max_iterations=2)


class ImageClassifier(L.LightningModule):
    """What a user writes around a vision backbone: cross-entropy, SGD, ``(x, y)`` batches."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class LabelSmoothing(ImageClassifier):
    """Trained with label smoothing, declared as the module's ``loss_fn``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)


class DictBatch(ImageClassifier):
    """Batches are ``{"image": ..., "label": ...}``."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"]), batch["label"])


@dataclasses.dataclass
class Output:
    """A Hugging Face-style model output."""

    logits: Tensor
    loss: Tensor | None = None


class HFStyleNet(nn.Module):
    """``forward(pixel_values, labels=None) -> Output`` like a Hugging Face image classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> Output:
        logits = self.head(torch.relu(self.conv(pixel_values)).flatten(1))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return Output(logits, loss)


class HFStyle(ImageClassifier):
    """A Hugging Face-style module: dict batches, the model computes its own loss."""

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> Output:
        return self.backbone(pixel_values, labels=labels)

    def training_step(self, batch, batch_idx):
        return self(batch["pixel_values"], labels=batch["labels"]).loss


class DictDataset(Dataset):
    def __init__(self, x: Tensor, y: Tensor, keys: tuple[str, str]) -> None:
        self.x, self.y, self.keys = x, y, keys

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {self.keys[0]: self.x[i], self.keys[1]: self.y[i]}


def images(n: int = 16, size: int = 8, channels: int = 3) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, channels, size, size, generator=gen), torch.randint(
        0, 10, (n,), generator=gen
    )


def tuple_loaders(size: int = 8):
    x, y = images(size=size)
    return DataLoader(TensorDataset(x[:12], y[:12]), batch_size=4), DataLoader(
        TensorDataset(x[12:], y[12:]), batch_size=4
    )


def dict_loaders(keys: tuple[str, str]):
    x, y = images()
    return DataLoader(DictDataset(x[:12], y[:12], keys), batch_size=4), DataLoader(
        DictDataset(x[12:], y[12:], keys), batch_size=4
    )


def token_loaders(vocab: int = 40, length: int = 6):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (12, length + 1), generator=gen)
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    return DataLoader(data, batch_size=4), DataLoader(data, batch_size=2)


def torchvision_resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=10)


def timm_model(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


def demo_transformer():
    from lightning.pytorch.demos import LightningTransformer

    class Offline(LightningTransformer):
        """The demo as it is, without its WikiText-2 download (the tests pass their own data)."""

        def prepare_data(self) -> None:
            return None

    return Offline(vocab_size=40)


IMAGE_OBSERVERS = dict(attack=QUICK_IG, estimator="lower_bound")
CASES = {
    "torchvision resnet18": (lambda: ImageClassifier(torchvision_resnet18()), tuple_loaders, {}),
    "timm vit_tiny (fused attention)": (
        lambda: ImageClassifier(timm_model("vit_tiny_patch16_224", img_size=8, patch_size=4)()),
        tuple_loaders,
        {},
    ),
    "timm convnext_atto": (
        lambda: ImageClassifier(timm_model("convnext_atto")()),
        lambda: tuple_loaders(size=32),
        {},
    ),
    "dict batch": (
        lambda: DictBatch(torchvision_resnet18()),
        lambda: dict_loaders(("image", "label")),
        {},
    ),
    "hugging face style": (
        lambda: HFStyle(HFStyleNet()),
        lambda: dict_loaders(("pixel_values", "labels")),
        {},
    ),
    "label smoothing": (lambda: LabelSmoothing(torchvision_resnet18()), tuple_loaders, {}),
    "lightning demo transformer": (
        demo_transformer,
        token_loaders,
        dict(attack=TokenLeakage(), adapter=lightning_demo_transformer()),
    ),
}


def observers(options: dict) -> list[L.Callback]:
    attack = options.get("attack", QUICK_IG)
    adapter = options.get("adapter")
    return [
        GradientDefense(GaussianNoise(std=1e-3), seed=0),
        InversionAudit(attack, every_n_train_steps=2, adapter=adapter, log_images=False),
        LeakageMonitor(
            every_n_train_steps=2,
            estimator="lower_bound",
            num_samples=1,
            num_delta_samples=1,
            adapter=adapter,
            max_seconds=None,  # timing is the cost test's business, not this one's (busy CI)
        ),
    ]


@pytest.mark.parametrize("case", list(CASES))
def test_defense_audit_and_monitor_on_the_users_model(case, fast_trainer_kwargs):
    build, loaders, options = CASES[case]
    torch.manual_seed(0)
    module = build()
    callbacks = observers(options)
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, callbacks=callbacks, **fast_trainer_kwargs
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed measurement fails the test
        trainer.fit(module, *loaders())
    metrics = trainer.callback_metrics
    assert metrics["attack/failed"].item() == 0.0 and metrics["leakage/failed"].item() == 0.0
    text = isinstance(options.get("attack"), TokenLeakage)
    assert ("attack/token_recall" if text else "attack/psnr") in metrics
    assert torch.isfinite(metrics["leakage/psnr_upper_bound"])
    assert "leakage/predicted_psnr" not in metrics  # a bound is not logged as a prediction


def test_dpsgd_trains_a_users_dict_batch_module(fast_trainer_kwargs):
    torch.manual_seed(0)
    module = DictBatch(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
        )
    )
    dp = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0)
    audit = InversionAudit(QUICK_IG, every_n_train_steps=2, log_images=False)
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, callbacks=[dp, audit], **fast_trainer_kwargs
    )
    trainer.fit(module, *dict_loaders(("image", "label")))
    assert dp.accountant.steps == 2 and "attack/psnr" in trainer.callback_metrics


def _flat(grads) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def test_the_audited_gradient_is_the_trained_one_under_label_smoothing():
    torch.manual_seed(0)
    module = LabelSmoothing(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))).eval()
    x, y = images(4)
    trained = torch.autograd.grad(module.training_step((x, y), 0), list(module.parameters()))
    adapter = resolve_adapter(module, None)
    audited = parameter_gradients(AdaptedModel(module, adapter), x, y, loss_fn=adapter.loss)
    cosine = F.cosine_similarity(_flat(trained), _flat(audited.values()), dim=0)
    assert adapter.loss_source == "module.loss_fn" and cosine >= 0.9999
    plain = parameter_gradients(module, x, y, loss_fn=F.cross_entropy)  # what was attacked before
    assert F.cosine_similarity(_flat(trained), _flat(plain.values()), dim=0) < 0.9999


class InlineLabelSmoothing(ImageClassifier):
    """Label smoothing inside training_step, no loss_fn attribute: observers cannot know it."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, label_smoothing=0.3)


def test_a_loss_the_adapter_does_not_replay_is_caught(fast_trainer_kwargs):
    module = InlineLabelSmoothing(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)))
    audit = InversionAudit(QUICK_IG, every_n_train_steps=5, log_images=False)
    trainer = L.Trainer(max_steps=1, limit_val_batches=1, callbacks=[audit], **fast_trainer_kwargs)
    with pytest.warns(UserWarning, match="differs from the loss training_step returns"):
        trainer.fit(module, *tuple_loaders())
    smoothing = ModelAdapter(loss_fn=lambda out, y: F.cross_entropy(out, y, label_smoothing=0.3))
    audit = InversionAudit(QUICK_IG, every_n_train_steps=5, log_images=False, adapter=smoothing)
    trainer = L.Trainer(max_steps=1, limit_val_batches=1, callbacks=[audit], **fast_trainer_kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*differs from the loss.*")
        trainer.fit(module, *tuple_loaders())


def test_fused_attention_is_run_with_a_double_backward():
    import timm

    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=8, patch_size=4
    )
    assert vit.blocks[0].attn.fused_attn  # timm's default: F.scaled_dot_product_attention
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    with differentiable_attention():
        (g,) = torch.autograd.grad(
            F.cross_entropy(vit(x), torch.tensor([1])), vit.head.weight, create_graph=True
        )
        (h,) = torch.autograd.grad(g.square().sum(), x)
    assert torch.isfinite(h).all()
