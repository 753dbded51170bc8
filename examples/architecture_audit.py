"""Which architecture, and which layer group, leaks the most? (seed-002's question)

ResNet-18, a small ViT and ConvNeXt-Atto (timm, ``pretrained=False``, 32 px, randomly
initialised, eval mode) face the same attack -- Inverting Gradients (cosine + TV, signed Adam)
with the same iteration budget, the label known -- on the same embedded photo patches. The
attacker sees first the whole gradient, then only one layer group's gradient (stem, attention,
MLP, norm, head). For a model whose stem is a linear patch embedding plus a learned position
embedding (the ViT), the stem's gradient is also attacked in closed form
(``analytic_patch_embedding``: the position embedding's gradient is the tokens' gradient, and
the patches solve a linear system), the row ``stem, closed form``. Prints PSNR/SSIM per
architecture and group and writes a grid of the reconstructions.

``--group-i2f STD`` adds, per architecture, the I²F predicted PSNR of every attacked layer group
under Gaussian noise ``STD`` on that group, beside Inverting Gradients on the same group.
``--stem-noise 1e-4,1e-3,...`` adds a table for the ViT: Gaussian noise of each std on the stem
gradient only, the closed-form stem attack's PSNR beside the I²F prediction for the same noise
and the same observed parameters (``sqrt(E I2F²) = std · sqrt(tr((J_stem J_stemᵀ)⁻¹))`` from the
dense Gram matrix of the stem's Jacobian), mean ± std over ``--images``.

    python examples/architecture_audit.py            # ~10-20 min on 1 busy CPU core
    python examples/architecture_audit.py --quick    # smoke run, seconds
    python examples/architecture_audit.py --architectures vit_tiny --groups stem --images 8 \
        --stem-noise 1e-4,1e-3,1e-2 --image-size 16
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import mean_std
from rich.console import Console
from rich.table import Table

from lightning_privacy.attacks import AnalyticPatchEmbedding, create_attack
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


def closed_form_stem(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, picks: torch.Tensor
) -> tuple[list[dict[str, float]], float, torch.Tensor] | None:
    """Scores of ``analytic_patch_embedding`` on the stem gradient of each pick, its seconds and
    the first reconstruction; ``None`` when the stem is not a patch + position embedding."""
    stem = layer_groups(model)["stem"]
    if not any("pos_embed" in name for name in stem):
        return None
    scores, seconds, first = [], 0.0, None
    for index in picks.tolist():
        x, y = images[index : index + 1], labels[index : index + 1]
        grads = parameter_gradients(model, x, y, loss_fn=F.cross_entropy)
        start = time.perf_counter()
        rec = AnalyticPatchEmbedding().reconstruct(
            model, {n: grads[n] for n in stem}, input_shape=tuple(x.shape[1:]), num_samples=1
        )
        seconds += time.perf_counter() - start
        scores.append(score(rec.inputs.detach().clamp(0, 1), x))
        first = rec.inputs.detach()[0] if first is None else first
    assert first is not None
    return scores, seconds, first


def trace_inverse(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]
) -> float:
    """``tr((J Jᵀ)⁻¹)`` of the Jacobian of the gradient of parameters ``names`` (dense)."""
    import re

    from lightning_privacy.functional.gradients import differentiable_attention
    from lightning_privacy.functional.leakage import LeakageOperator, gram_solver

    exact = [f"^{re.escape(name)}$" for name in names]
    with differentiable_attention():
        op = LeakageOperator(model, x, y, layers=exact)
        return gram_solver(op, method="dense").trace_inverse()


def group_i2f_table(
    console: Console,
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    std: float,
    attacked: dict[str, float],
) -> None:
    """Per layer group: the I²F predicted PSNR at Gaussian noise ``std`` on that group (the
    attacker sees that group only) beside Inverting Gradients on the same group."""
    from lightning_privacy.functional.leakage import predicted_psnr

    images, labels, picks = data
    table = Table(title=f"I²F per layer group, Gaussian noise std {std:g} on the group")
    for column in ("group", "parameters", "I²F predicted PSNR (dB)", "IG PSNR, no noise (dB)"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for group, names in layer_groups(model).items():
        if not names or group not in attacked:
            continue
        values = []
        for index in picks.tolist():
            x, y = images[index : index + 1], labels[index : index + 1]
            i2f = std * trace_inverse(model, x, y, names) ** 0.5
            values.append(float(predicted_psnr(i2f, x.numel())))
        count = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
        table.add_row(group, f"{count:,}", mean_std(values), f"{attacked[group]:.2f}")
        print(
            f"# group {group}: I2F {mean_std(values)} dB, IG {attacked[group]:.2f} dB", flush=True
        )
    console.print(table)


def stem_noise_table(
    console: Console,
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    picks: torch.Tensor,
    stds: list[float],
    seed: int,
) -> None:
    """Closed-form stem attack under Gaussian noise on the stem vs the I²F prediction."""
    from lightning_privacy.functional.leakage import predicted_psnr

    stem = layer_groups(model)["stem"]
    attack = AnalyticPatchEmbedding(tol=None)
    generator = torch.Generator().manual_seed(seed)
    attacked: dict[float, list[float]] = {s: [] for s in stds}
    predicted: dict[float, list[float]] = {s: [] for s in stds}
    for index in picks.tolist():
        x, y = images[index : index + 1], labels[index : index + 1]
        grads = parameter_gradients(model, x, y, loss_fn=F.cross_entropy)
        trace = trace_inverse(model, x, y, stem)
        for std in stds:
            noisy = {
                n: grads[n] + std * torch.randn(grads[n].shape, generator=generator) for n in stem
            }
            rec = attack.reconstruct(model, noisy, input_shape=tuple(x.shape[1:]), num_samples=1)
            attacked[std].append(score(rec.inputs.detach().clamp(0, 1), x)["psnr"])
            i2f = std * trace**0.5
            predicted[std].append(float(predicted_psnr(i2f, x.numel())))
    table = Table(title=f"ViT stem under Gaussian noise on the stem gradient, {len(picks)} images")
    for column in ("noise std", "closed-form attack PSNR (dB)", "I²F predicted PSNR (dB)"):
        table.add_column(column, justify="right")
    for std in stds:
        table.add_row(f"{std:g}", mean_std(attacked[std]), mean_std(predicted[std]))
        print(
            f"# stem noise {std:g}: attack {mean_std(attacked[std])} dB, "
            f"I2F {mean_std(predicted[std])} dB",
            flush=True,
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--iterations", type=int, default=None, help="attack budget (Adam steps)")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--out", default="runs/architecture_audit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--stem-noise", default=None, help="noise stds for the ViT stem table")
    parser.add_argument(
        "--group-i2f", type=float, default=None, help="noise std of the per-group I²F table"
    )
    parser.add_argument(
        "--groups", nargs="*", default=None, help="layer groups to attack alone (none: skip)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    iterations = args.iterations or (3 if args.quick else 100)
    groups = tuple(args.groups) if args.groups is not None else GROUPS
    if args.quick and args.groups is None:
        groups = ("stem", "head")
    images, labels = load_photo_patches(image_size=args.image_size, channels=3)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    picks = order[: args.images]
    num_classes = int(labels.max()) + 1
    attack = create_attack("inverting_gradients", max_iterations=iterations)
    console = Console()
    table = Table(
        title=f"Inverting Gradients, {iterations} iterations, {len(picks)} image(s), "
        f"{args.image_size} px, "
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
        model = build_timm_model(arch, num_classes=num_classes, image_size=args.image_size).eval()
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
        closed = closed_form_stem(model, images, labels, picks) if "stem" in groups else None
        if closed is not None:
            scores, seconds, first = closed
            psnr = sum(s["psnr"] for s in scores) / len(scores)
            ssim = sum(s["ssim"] for s in scores) / len(scores)
            stem_count = sum(p.numel() for n, p in model.named_parameters() if n in named["stem"])
            row = (f"{stem_count:,}", f"{psnr:.2f}", f"{ssim:.3f}", f"{seconds:.2f}")
            table.add_row(arch, "stem, closed form", *row)
            grid.append((f"{arch} stem, closed form", first))
            print(f"# {arch} stem, closed form: PSNR {psnr:.2f} dB, SSIM {ssim:.3f}", flush=True)
        table.add_section()
        if args.stem_noise and closed is not None:
            stds = [float(v) for v in args.stem_noise.split(",")]
            stem_noise_table(console, model, images, labels, picks, stds, args.seed)
        if args.group_i2f is not None:
            data = (images, labels, picks)
            group_i2f_table(console, model, data, args.group_i2f, summary.get(arch, {}))
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
