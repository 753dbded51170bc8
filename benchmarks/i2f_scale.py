"""The I2F on real models: seconds per example, in training steps of the same model, side by side.

One table, every row measured in this run: for each model and input, each estimator's wall time
per example (median over the examples), that time divided by one training step of the same model
at batch 64 (forward, backward, SGD step; median of 5 after 2 warm-up steps, timed in the same
run so the ratio survives a busy machine), its error against the exact estimate and its Spearman
correlation with it across the examples.

Setting: one example per gradient (batch size 1, label known), the model in eval mode, untrained
(PyTorch's default initialisation; the DLG LeNet with its U(-0.5, 0.5)),
δ = GaussianNoise(std=sigma) with sigma fixed per model (``--rel-noise`` x the median ‖g‖ over
the examples / √d_θ, so ‖δ‖ ≈ 1 % of ‖g‖), 4 draws per example, the same draws (same generator
seeds) for every estimator. Images:
LFW faces (grayscale) for the LeNet, patches of ``skimage.data`` photos for the others.

Estimators (``lightning_privacy.leakage.estimate_leakage``):

* ``exact (dense)``: ``estimator="exact", method="dense"``: ``J Jᵀ`` assembled from its ``d_x``
  columns (batched layer-rule products) and Cholesky-factorised. Its error column is against a
  float64 dense reference on the same δ (``--reference-examples`` examples; float64 convolutions
  are slow on CPU).
* ``exact (PCG)``: ``estimator="exact", method="pcg"``: conjugate gradients to ``tol=1e-6``,
  preconditioned by the first layers' Gram matrix; error and Spearman against exact (dense).
* ``approximate``: ``estimator="approximate"`` (the same, stopped at ``tol=1e-1``).

Examples: 10 on the LeNet and ResNet-18 3x32x32 (exact (PCG) on 3 of them); on the three
heavy models (CIFAR ResNet-18, ViT-Tiny, ResNet-18 at 3x64x64) the approximate estimator runs
on 2 and exact on 1: by PCG, except on the ViT, where dense is the cheaper exact path (PCG
needs some 800 iterations there); no float64 reference runs on them. Each row's reference is
the exact estimator with the most examples (dense on a tie); every other row gives its ratio
against it with ``n``, and against exact (dense) where that ran on fewer. Every estimate runs
under the product's budget (``max_seconds``, ``--max-seconds``): a row whose first example did
not finish within it says so.

    python benchmarks/i2f_scale.py                   # the README table (2 threads, ~1 h)
    python benchmarks/i2f_scale.py --quick           # 2 examples, small models only
    python benchmarks/i2f_scale.py --device cuda     # the same table on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from lightning_privacy.data import load_lfw_tensors, load_photo_patches
from lightning_privacy.defenses import GaussianNoise
from lightning_privacy.functional.leakage import LeakageOperator, i2f
from lightning_privacy.functional.precision import full_precision
from lightning_privacy.leakage import estimate_leakage
from lightning_privacy.models import LeNetDLG, resnet18_cifar

ESTIMATORS = {
    "exact (dense)": dict(estimator="exact", method="dense"),
    "exact (PCG)": dict(estimator="exact", method="pcg"),
    "approximate": dict(estimator="approximate"),
}


@dataclass
class Case:
    """One row group: a model, its inputs and what was measured on it."""

    key: str
    title: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    counts: dict[str, int] = field(default_factory=dict)  # examples per estimator
    float64: bool = True  # whether the float64 dense reference runs
    times: dict[str, list[float]] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)
    reference: list[float] = field(default_factory=list)  # rel. error of f32 dense vs f64 dense
    step: float = math.nan
    timed_out: dict[str, float] = field(default_factory=dict)  # seconds spent, no result
    notes: list[str] = field(default_factory=list)


def vit_tiny() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=4
    )


def torchvision_resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=10)


def lenet() -> nn.Module:
    torch.manual_seed(0)
    return LeNetDLG(num_classes=2, channels=1, image_size=32, init="uniform")


def cases(args: argparse.Namespace) -> list[Case]:
    """The five models; the three heavy ones on fewer examples (their dense path costs minutes)."""
    main = {
        "exact (dense)": args.examples,
        "exact (PCG)": args.pcg_examples,
        "approximate": args.examples,
    }
    heavy = {
        "exact (dense)": args.heavy_dense_examples,
        "exact (PCG)": args.heavy_pcg_examples,
        "approximate": args.heavy_examples,
    }
    # the ViT's exact estimate is cheapest dense (3,072 columns; PCG needs ~800 iterations)
    vit = {**heavy, "exact (dense)": max(1, args.heavy_dense_examples), "exact (PCG)": 0}
    out = [
        Case("lenet", "DLG LeNet, 1x32x32", lenet, (1, 32, 32), main),
        Case("resnet18", "torchvision ResNet-18, 3x32x32", torchvision_resnet18, (3, 32, 32), main),
        Case(
            "resnet18_cifar",
            "CIFAR ResNet-18 (resnet18_cifar), 3x32x32",
            resnet18_cifar,
            (3, 32, 32),
            heavy,
            float64=False,
        ),
        Case("vit_tiny", "timm ViT-Tiny (patch 4), 3x32x32", vit_tiny, (3, 32, 32), vit, False),
        Case(
            "resnet18_64",
            "torchvision ResNet-18, 3x64x64",
            torchvision_resnet18,
            (3, 64, 64),
            heavy,
            float64=False,
        ),
    ]
    keep = args.models.split(",") if args.models else [c.key for c in out]
    return [c for c in out if c.key in keep]


def inputs(case: Case, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real images of the case's shape and labels (within the model's classes)."""
    channels, size = case.shape[0], case.shape[1]
    if channels == 1:
        images, labels = load_lfw_tensors(image_size=size, channels=1)
        faces = torch.nonzero(labels == 1).flatten()[:n]
        return images[faces].to(device), labels[faces].to(device)
    images, _ = load_photo_patches(image_size=size, channels=channels, patches_per_photo=8)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]
    return images[pick].to(device), (torch.arange(n) % 10).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_step(model: nn.Module, case: Case, device: torch.device) -> float:
    """Median seconds of one SGD step at batch 64 (forward, backward, step)."""
    x = torch.rand(64, *case.shape, generator=torch.Generator().manual_seed(1)).to(device)
    y = (torch.arange(64) % 2 if case.key == "lenet" else torch.arange(64) % 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.train()
    times = []
    for i in range(7):
        sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    model.eval()
    opt.zero_grad(set_to_none=True)
    return statistics.median(times)


def noise_std(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rel: float) -> float:
    """``rel`` x the median gradient norm / √d_θ: ‖δ‖ ≈ rel ‖g‖."""
    norms, dim = [], 0
    for i in range(len(x)):
        op = LeakageOperator(model, x[i : i + 1], y[i : i + 1])
        norms.append(float(op.gradient.norm()))
        dim = op.param_dim
    return rel * statistics.median(norms) / math.sqrt(dim)


def timed_estimate(model, x, y, sigma, seed, device, **kwargs) -> tuple[float, float]:
    """``(I2F, seconds)`` of one example with the estimator ``kwargs``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sync(device)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = estimate_leakage(
            model,
            x,
            y,
            transforms=[GaussianNoise(std=sigma)],
            generator=gen,
            num_delta_samples=4,
            **kwargs,
        )
    sync(device)
    return float(est.per_sample_i2f[0]), time.perf_counter() - start


def float64_check(model, x, y, sigma) -> float:
    """Relative error of the float32 dense I2F against float64 on the same δ draws."""
    op = LeakageOperator(model, x, y)
    gen = torch.Generator(device=x.device).manual_seed(123)
    delta = sigma * torch.randn(4, op.param_dim, generator=gen, device=x.device)
    f32 = float(i2f(model, x, y, delta, method="dense").value.mean())
    model64 = _double(model)
    f64 = float(i2f(model64, x.double(), y, delta.double(), method="dense").value.mean())
    return abs(f32 - f64) / f64


def _double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def measure(case: Case, args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(0)  # the same untrained weights in every run
    model = case.build().to(device)
    case.step = training_step(model, case, device)
    x, y = inputs(case, max(case.counts.values()), device)
    sigma = noise_std(model, x, y, args.rel_noise)
    case.notes.append(f"sigma = {sigma:.2e}")
    _warm_up(model, x, y, sigma, device)
    for name, kwargs in ESTIMATORS.items():
        for i in range(min(case.counts[name], len(x))):
            try:
                value, seconds = timed_estimate(
                    model,
                    x[i : i + 1],
                    y[i : i + 1],
                    sigma,
                    1000 + i,
                    device,
                    max_seconds=args.max_seconds,
                    **kwargs,
                )
            except TimeoutError:  # the product's budget: no example finished within it
                case.timed_out[name] = args.max_seconds
                print(f"  {case.key} {name} example {i}: over {args.max_seconds:.0f} s", flush=True)
                break
            case.values.setdefault(name, []).append(value)
            case.times.setdefault(name, []).append(seconds)
            print(
                f"  {case.key} {name} example {i}: I2F {value:.4g} in {seconds:.1f} s", flush=True
            )
    for i in range(min(args.reference_examples, len(x)) if case.float64 else 0):
        case.reference.append(float64_check(model, x[i : i + 1], y[i : i + 1], sigma))
    with full_precision():  # as the estimators run (TF32 would fail the products' check)
        products = LeakageOperator(model, x[:1], y[:1]).batched_products()
    if products is not None:
        case.notes.append(f"{products.mode} rules, {products.chunk_size} columns per pass")


def _warm_up(model, x, y, sigma, device) -> None:
    """One untimed small run of each path (lazy imports, thread pools, allocator)."""
    for kwargs in ESTIMATORS.values():
        with contextlib.suppress(TimeoutError):
            timed_estimate(model, x[:1], y[:1], sigma, 0, device, max_seconds=2.0, **kwargs)


def spearman(a: list[float], b: list[float]) -> float:
    n = min(len(a), len(b))
    return float(spearmanr(a[:n], b[:n]).statistic) if n > 2 else math.nan


def _reference(case: Case) -> str:
    """The exact estimator with the most examples (dense on a tie): the rows' reference."""
    return max(("exact (dense)", "exact (PCG)"), key=lambda n: len(case.values.get(n, [])))


def _agreement(values: list[float], against: list[float], name: str) -> str:
    n = min(len(values), len(against))
    ratios = [v / a for v, a in zip(values[:n], against[:n], strict=True)]
    return (
        f"median ratio {statistics.median(ratios):.3f}, max |err| "
        f"{max(abs(r - 1) for r in ratios):.1e} vs {name} (n={n})"
    )


def rows(case: Case) -> Iterator[list[str]]:
    reference = _reference(case)
    base = case.values.get(reference, [])
    dense = case.values.get("exact (dense)", [])
    for name in ESTIMATORS:
        values, times = case.values.get(name, []), case.times.get(name, [])
        if not values and name in case.timed_out:
            budget = case.timed_out[name]
            over = [f"> {budget:.0f}", f"> {budget / case.step:.0f}"]
            yield [case.title, name, *over, "stopped at max_seconds: no example finished", "—"]
            continue
        if not values:
            continue
        seconds = statistics.median(times)
        if name == "exact (dense)" and case.reference:
            error = f"{max(case.reference):.1e} vs float64 dense (n={len(case.reference)})"
        elif name == "exact (dense)":
            error = "float64 not run" if name == reference else _agreement(values, base, reference)
        elif name == reference:
            error = _agreement(values, dense, "exact (dense)") if dense else "(reference)"
        else:
            error = _agreement(values, base, reference)
            if reference != "exact (dense)" and dense:
                error += "; " + _agreement(values, dense, "exact (dense)")
        n = min(len(values), len(base))
        if name == reference:
            rho = "(reference)"
        else:
            rho = f"{spearman(values, base):.3f} (n={n})" if n > 2 else f"— (n={n})"
        yield [case.title, name, f"{seconds:.2f}", f"{seconds / case.step:.1f}", error, rho]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a GPU is not needed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--examples", type=int, default=10, help="LeNet and ResNet-18 32x32")
    parser.add_argument("--pcg-examples", type=int, default=3, help="exact (PCG) there")
    parser.add_argument("--heavy-examples", type=int, default=2, help="the three heavy models")
    parser.add_argument("--heavy-pcg-examples", type=int, default=1)
    parser.add_argument("--heavy-dense-examples", type=int, default=0)
    parser.add_argument("--reference-examples", type=int, default=1)
    parser.add_argument("--rel-noise", type=float, default=0.01)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=900.0,
        help="the estimator's budget per example (max_seconds); a row over it says so",
    )
    parser.add_argument("--models", default="", help="comma-separated subset of the model keys")
    parser.add_argument("--quick", action="store_true", help="2 examples, LeNet and ResNet-18")
    args = parser.parse_args()
    if args.quick:
        args.examples, args.models = 3, args.models or "lenet,resnet18"
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (the default is cpu)")
    started, load = time.perf_counter(), os.getloadavg()[0]
    measured = []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
        for case in cases(args):
            print(f"# {case.title}", flush=True)
            measure(case, args, device)
            measured.append(case)
            for row in rows(case):  # as soon as measured: a run cut short keeps its rows
                print("  row: | " + " | ".join(row) + " |", flush=True)
            print(f"  training step {case.step:.3f} s", flush=True)
    header = [
        "model, input",
        "estimator",
        "s per example",
        "÷ one training step (batch 64)",
        "error vs exact",
        "Spearman vs exact",
    ]
    print()
    print("| " + " | ".join(header) + " |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for case in measured:
        for row in rows(case):
            print("| " + " | ".join(row) + " |")
    print()
    for case in measured:
        print(f"- {case.title}: training step {case.step:.3f} s; " + "; ".join(case.notes))
    print(
        f"\n{args.threads} threads on {device}, torch {torch.__version__}; load average "
        f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
        f"{time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    main()
