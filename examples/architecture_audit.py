"""Which architecture, and which layer group, leaks the most? (seed-002's question)

ResNet-18, a small ViT and ConvNeXt-Atto (timm, ``pretrained=False``, 32 px, randomly
initialised, eval mode) face the same attack -- Inverting Gradients (cosine + TV, signed Adam)
with the same iteration budget, the label known -- on the same embedded photo patches. The
attacker sees first the whole gradient, then only one layer group's gradient (stem, attention,
MLP, norm, head). Prints PSNR/SSIM per architecture and group and writes a
grid of the reconstructions.

    python examples/architecture_audit.py            # ~10-20 min on 1 busy CPU core
    python examples/architecture_audit.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from lightning_privacy.attacks import create_attack
from lightning_privacy.data import load_photo_patches
from lightning_privacy.functional.gradients import parameter_gradients
from lightning_privacy.models.timm_models import ARCHITECTURES, build_timm_model, layer_groups

GROUPS = ("stem", "attention", "mlp", "norm", "head")


def score(reconstruction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    try:
        from lightning_privacy.metrics import reconstruction_metrics

        metrics = reconstruction_metrics(reconstruction, target, data_range=1.0)
        return {"psnr": float(metrics["psnr"]), "ssim": float(metrics["ssim"])}
    except ImportError:  # the metrics component not available: torchmetrics directly
        from torchmetrics.functional.image import (
            peak_signal_noise_ratio,
            structural_similarity_index_measure,
        )

        return {
            "psnr": float(peak_signal_noise_ratio(reconstruction, target, data_range=1.0)),
            "ssim": float(structural_similarity_index_measure(reconstruction, target)),
        }


def save_grid(rows: list[tuple[str, torch.Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(1.6 * len(rows), 1.9), dpi=100)
    for ax, (title, image) in zip(axes, rows, strict=True):
        ax.imshow(image.clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--iterations", type=int, default=None, help="attack budget (Adam steps)")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--out", default="runs/architecture_audit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument(
        "--groups", nargs="*", default=None, help="layer groups to attack alone (none: skip)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    iterations = args.iterations or (3 if args.quick else 100)
    groups = tuple(args.groups) if args.groups is not None else GROUPS
    if args.quick and args.groups is None:
        groups = ("stem", "head")
    images, labels = load_photo_patches(image_size=32, channels=3)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    picks = order[: args.images]
    num_classes = int(labels.max()) + 1
    attack = create_attack("inverting_gradients", max_iterations=iterations)
    console = Console()
    table = Table(
        title=f"Inverting Gradients, {iterations} iterations, {len(picks)} image(s), 32 px, "
        "labels known, random init, eval mode"
    )
    for column in ("architecture", "gradient seen", "params", "PSNR (dB)", "SSIM", "seconds"):
        table.add_column(column, justify="left" if column in ("architecture",) else "right")
    grey = [score(torch.full_like(images[i : i + 1], 0.5), images[i : i + 1]) for i in picks]
    table.add_row(
        "reference",
        "none (grey image)",
        "—",
        f"{sum(s['psnr'] for s in grey) / len(grey):.2f}",
        f"{sum(s['ssim'] for s in grey) / len(grey):.3f}",
        "—",
    )
    table.add_section()
    grid: list[tuple[str, torch.Tensor]] = [("truth", images[picks[0]])]
    summary: dict[str, dict[str, float]] = {}
    for arch in args.architectures:
        torch.manual_seed(args.seed)
        model = build_timm_model(arch, num_classes=num_classes).eval()
        named = layer_groups(model)
        for group in ("all", *groups):
            names = [n for n, _ in model.named_parameters()] if group == "all" else named[group]
            if not names:
                table.add_row(arch, group, "0", "—", "—", "—")
                continue
            count = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
            scores, seconds = [], 0.0
            for index in picks.tolist():
                x, y = images[index : index + 1], labels[index : index + 1]
                grads = parameter_gradients(model, x, y, loss_fn=F.cross_entropy)
                observed = {n: grads[n] for n in names}
                start = time.perf_counter()
                rec = attack.reconstruct(
                    model,
                    observed,
                    input_shape=tuple(x.shape[1:]),
                    num_samples=1,
                    labels=y,
                    generator=torch.Generator().manual_seed(args.seed),
                )
                seconds += time.perf_counter() - start
                scores.append(score(rec.inputs.detach().clamp(0, 1), x))
                if group == "all" and index == picks[0]:
                    grid.append((arch, rec.inputs.detach()[0]))
            psnr = sum(s["psnr"] for s in scores) / len(scores)
            ssim = sum(s["ssim"] for s in scores) / len(scores)
            summary.setdefault(arch, {})[group] = psnr
            table.add_row(arch, group, f"{count:,}", f"{psnr:.2f}", f"{ssim:.3f}", f"{seconds:.0f}")
            print(
                f"# {arch} {group}: PSNR {psnr:.2f} dB, SSIM {ssim:.3f}, {seconds:.0f} s",
                flush=True,
            )
        table.add_section()
    console.print(table)
    out = Path(args.out)
    save_grid(grid, out / "reconstructions.png")
    for arch, by_group in summary.items():
        ranked = sorted(((v, g) for g, v in by_group.items() if g != "all"), reverse=True)
        if ranked:
            console.print(
                f"{arch}: full gradient {by_group['all']:.2f} dB; most leaking group alone: "
                f"{ranked[0][1]} ({ranked[0][0]:.2f} dB)"
            )
    console.print(f"Grid of reconstructions (full gradient): {out / 'reconstructions.png'}")


if __name__ == "__main__":
    main()
