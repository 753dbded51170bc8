"""Cost of the exact I2F vs one converged gradient-inversion attack, measured side by side.

Sigmoid DLG LeNet (U(-0.5, 0.5) init), LFW faces at 32x32 grayscale, batch size 1, label known.
For each face: δ = Gaussian noise with ‖δ‖ = rel_noise · ‖g‖; the exact I2F in float32 (one
assembly and Cholesky factorisation of J Jᵀ, then a solve), checked against a float64 dense
reference (must be within 5 %); the lower bound (matrix-free Lanczos); and a converged
DeepLeakage attack (L-BFGS, strong-Wolfe, U(0, 1) start, no box) on the same noisy gradient.
The ratio t(I2F) / t(attack) is the number the product promises (target <= 1/10); both are timed
after one untimed warm-up call, in wall-clock and in process CPU time, each ``--repeats`` times
(median kept; the attack is deterministic, so its repeats only remove timing noise).

    python benchmarks/i2f_cost.py            # 5 faces
    python benchmarks/i2f_cost.py --quick    # 1 face, short attack
    python benchmarks/i2f_cost.py --device cuda    # the same table on a GPU

With ``--device cuda`` the model, faces, δ and the attack's dummies live on the GPU (the attack
runs under ``with torch.device("cuda")`` with a CUDA generator, so its random start is drawn
there), and every timing point follows ``torch.cuda.synchronize``; the CPU-time column then
counts only the host's share.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from lightning_privacy.attacks import DeepLeakage
from lightning_privacy.data import load_lfw_tensors
from lightning_privacy.functional.leakage import (
    GramFactorization,
    LeakageOperator,
    i2f_from_operator,
    i2f_lower_bound,
)
from lightning_privacy.models import LeNetDLG


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def exact_i2f(model, x, y, delta):
    sync(x.device)
    start, cpu = time.perf_counter(), time.process_time()
    op = LeakageOperator(model, x, y)
    fact = GramFactorization(op.gram())
    value = float(i2f_from_operator(op, delta, factorization=fact).value[0])
    sync(x.device)
    return value, time.perf_counter() - start, time.process_time() - cpu


def converged_attack(model, observed, y, steps, seed):
    attack = DeepLeakage(max_iterations=steps, restarts=1, box=None, tol=0.0)
    device = y.device
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.device(device):  # the dummies on the model's device
        rec = attack.reconstruct(
            model,
            observed,
            input_shape=(1, 32, 32),
            num_samples=1,
            labels=y,
            generator=torch.Generator(device=device).manual_seed(seed),
        )
    sync(device)
    return rec, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 face, short attack")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--rel-noise", type=float, default=0.01)
    parser.add_argument("--attack-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3, help="timings per side (median kept)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu or cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (the default is cpu)")
    device = torch.device(args.device)
    where = f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "1 CPU thread"
    torch.set_num_threads(1)
    samples = 1 if args.quick else args.samples
    steps = 20 if args.quick else args.attack_steps

    torch.manual_seed(0)
    images, labels = load_lfw_tensors(image_size=32, channels=1)
    faces = torch.nonzero(labels == 1).flatten()[:samples]
    images, labels = images.to(device), labels.to(device)
    model = LeNetDLG(num_classes=2, channels=1, image_size=32, init="uniform").eval().to(device)
    model64 = copy.deepcopy(model).double()

    table = Table(title=f"Exact I2F vs one converged attack (same sample, same run, {where})")
    for col in (
        "face",
        "I2F f32",
        "dense f64",
        "rel. err",
        "lower bound",
        "attack L2 err",
        "err / I2F",
        "t I2F [s]",
        "t bound [s]",
        "t attack [s]",
        "evals",
        "t I2F / t attack",
        "CPU I2F / CPU attack",
    ):
        table.add_column(col, justify="right")
    ratios, cpu_ratios = [], []
    # Warm-up, not timed: one-time costs (lazy imports, torch.func tracing caches, BLAS thread
    # pools) are paid once per process, not per estimate.
    warm_x, warm_y = images[faces[0] : faces[0] + 1], labels[faces[0] : faces[0] + 1]
    warm_delta = torch.zeros(LeakageOperator(model, warm_x, warm_y).param_dim, device=device)
    exact_i2f(model, warm_x, warm_y, warm_delta)
    warm_obs = [torch.zeros_like(p) for p in model.parameters()]
    with torch.device(device):
        DeepLeakage(max_iterations=1, restarts=1, box=None).reconstruct(
            model, warm_obs, input_shape=(1, 32, 32), num_samples=1, labels=warm_y
        )
    for k, idx in enumerate(faces.tolist()):
        x, y = images[idx : idx + 1], labels[idx : idx + 1]
        op = LeakageOperator(model, x, y)
        g = op.gradient
        noise = torch.randn(g.numel(), generator=torch.Generator().manual_seed(k)).to(device)
        delta = noise / noise.norm() * args.rel_noise * g.norm()

        runs = [exact_i2f(model, x, y, delta) for _ in range(max(1, args.repeats))]
        value = runs[0][0]
        t_i2f = statistics.median(r[1] for r in runs)
        cpu_i2f = statistics.median(r[2] for r in runs)
        ref, _, _ = exact_i2f(model64, x.double(), y, delta.double())
        sync(device)
        start = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(0)
        bound = i2f_lower_bound(model, x, y, delta, generator=gen)
        sync(device)
        t_bound = time.perf_counter() - start

        observed = [
            t.reshape(s) for t, s in zip(torch.split(g + delta, op.numels), op.shapes, strict=True)
        ]
        attack_runs = [
            converged_attack(model, observed, y, steps, seed=100 + k)
            for _ in range(max(1, args.repeats))
        ]
        rec = attack_runs[0][0]
        t_attack = statistics.median(r[1] for r in attack_runs)
        cpu_attack = statistics.median(r[2] for r in attack_runs)
        err = float((rec.inputs - x).norm())
        ratios.append(t_i2f / t_attack)
        cpu_ratios.append(cpu_i2f / cpu_attack)
        table.add_row(
            str(idx),
            f"{value:.4f}",
            f"{ref:.4f}",
            f"{abs(value - ref) / ref:.1e}",
            f"{float(bound.value[0]):.2e}",
            f"{err:.4f}",
            f"{err / value:.3f}",
            f"{t_i2f:.2f}",
            f"{t_bound:.2f}",
            f"{t_attack:.2f}",
            str(rec.metadata["evaluations"]),
            f"1/{1 / ratios[-1]:.1f}",
            f"1/{1 / cpu_ratios[-1]:.1f}",
        )
    console = Console(width=200)
    console.print(table)
    median = statistics.median(ratios)
    console.print(
        f"median t(I2F)/t(attack) = 1/{1 / median:.1f} (target <= 1/10; CPU time: "
        f"1/{1 / statistics.median(cpu_ratios):.1f}); "
        f"rel. noise ‖δ‖/‖g‖ = {args.rel_noise}, "
        f"attack budget {steps} L-BFGS steps x 20 evaluations; median of {args.repeats} "
        f"timings per side; device {where}"
    )


if __name__ == "__main__":
    main()
