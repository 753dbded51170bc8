"""The paper's recommendation tested: noise on the leaking layers vs the same noise spread out.

"Introduce additional noise to the privacy-leakage layers" (``../shared/papers/002_*``). A ViT's
stem gives its input back exactly (``analytic_patch_embedding``), so the stem is the layer group
to defend. Three ViT-Tiny models (timm, patch 4, random init) train on the embedded photo
patches with the same seed and settings:

* no defense;
* ``GradientDefense(GaussianNoise(std), layers=<stem>)``: noise on the stem's gradient only;
* ``GradientDefense(GaussianNoise(std · sqrt(n_stem / n_all)))``: the same total noise energy
  (``Σ E‖noise‖²``) spread over every parameter.

Then the attacker sees the defended gradient of single held-out images (each trained model, eval
mode, the run's own transform on the whole gradient) and runs the closed-form stem attack; PSNR
mean ± std over ``--images``, beside each model's train and validation accuracy.

    python examples/targeted_noise.py                 # 1.5-3 min on one thread
    python examples/targeted_noise.py --grid docs/targeted_noise.png   # and the reconstructions
    python examples/targeted_noise.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from _common import accuracy, fit_classifier, mean_std, photo_split, save_image_grid
from rich.console import Console
from rich.table import Table

from lightning_privacy.attacks import AnalyticPatchEmbedding
from lightning_privacy.callbacks import GradientDefense
from lightning_privacy.defenses import GaussianNoise
from lightning_privacy.functional.gradients import parameter_gradients
from lightning_privacy.models import LitClassifier
from lightning_privacy.models.timm_models import build_timm_model, layer_groups
from lightning_privacy.sweep.trial import quiet_lightning

STEM = r"patch_embed|pos_embed|cls_token"


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(reconstruction.clamp(0, 1), target, data_range=1.0))


def attack_psnrs(
    module: LitClassifier, noise: GaussianNoise | None, layers: str | None, data: dict, seed: int
) -> tuple[list[float], torch.Tensor]:
    """The closed-form stem attack on the defended gradient of each held-out image: PSNRs and
    the reconstructions."""
    vit = module.model
    stem = layer_groups(vit)["stem"]
    generator = torch.Generator().manual_seed(seed)
    x_val, y_val = data["val"]
    scores, reconstructions = [], []
    for index in range(data["images"]):
        x, y = x_val[index : index + 1], y_val[index : index + 1]
        grads = parameter_gradients(vit, x, y, loss_fn=F.cross_entropy)
        names = [n for n in grads if layers is None or n in stem]
        if noise is not None:
            defended = noise([grads[n] for n in names], generator=generator)
            grads.update(dict(zip(names, defended, strict=True)))
        rec = AnalyticPatchEmbedding(tol=None).reconstruct(
            vit, {n: grads[n] for n in stem}, input_shape=tuple(x.shape[1:]), num_samples=1
        )
        scores.append(psnr(rec.inputs.detach(), x))
        reconstructions.append(rec.inputs.detach()[0].clamp(0, 1))
    return scores, torch.stack(reconstructions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--std", type=float, default=1e-3, help="noise std on the stem")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="PNG path for the reconstructions")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.images, args.image_size = 1, 2, 8
    torch.set_num_threads(1)
    quiet_lightning()
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    data = {**photo_split(args.image_size, args.seed), "images": args.images}
    probe = build_timm_model("vit_tiny", num_classes=data["classes"], image_size=args.image_size)
    n_all = sum(p.numel() for p in probe.parameters())
    n_stem = sum(p.numel() for n, p in probe.named_parameters() if n in layer_groups(probe)["stem"])
    spread = args.std * math.sqrt(n_stem / n_all)
    runs = [
        ("none", None, None),
        (f"stem only, std {args.std:g}", GaussianNoise(std=args.std), STEM),
        (f"all layers, std {spread:.3g} (same energy)", GaussianNoise(std=spread), None),
    ]
    table = Table(
        title=f"ViT-Tiny, {args.image_size} px photos, {args.epochs} epochs; closed-form stem "
        f"attack on {args.images} held-out images ({n_stem:,} of {n_all:,} parameters in the stem)"
    )
    for column in ("defense", "train acc", "val acc", "stem attack PSNR (dB)", "s"):
        table.add_column(column, justify="left" if column == "defense" else "right")
    grid = [("truth", data["val"][0][: args.images])]
    for label, noise, layers in runs:
        start = time.perf_counter()
        defense = None if noise is None else GradientDefense([noise], layers=layers, seed=args.seed)
        vit = partial(
            build_timm_model, "vit_tiny", num_classes=data["classes"], image_size=args.image_size
        )
        module = fit_classifier(
            vit,
            data,
            epochs=args.epochs,
            lr=args.lr,
            seed=args.seed,
            callbacks=[defense] if defense else [],
        )
        scores, reconstructions = attack_psnrs(module, noise, layers, data, args.seed)
        grid.append((label.split(",")[0], reconstructions))
        mean = sum(scores) / len(scores)
        row = (
            f"{accuracy(module, *data['train']):.3f}",
            f"{accuracy(module, *data['val']):.3f}",
            mean_std(scores),
            f"{time.perf_counter() - start:.0f}",
        )
        table.add_row(label, *row)
        print(f"# {label}: train {row[0]}, val {row[1]}, attack {mean:.2f} dB", flush=True)
    Console(width=120).print(table)
    if args.grid:
        save_image_grid(grid, args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
