"""Does the I2F predict a converged gradient-inversion attack? Five checks on the DLG LeNet.

Sigmoid DLG LeNet (``LeNetDLG``, U(-0.5, 0.5) init unless stated), LFW faces at 32x32 grayscale,
one face per gradient (batch size 1), label known to the attacker. The attack is
``lightning_privacy.attacks.DeepLeakage`` (L-BFGS with strong-Wolfe line search from a U(0, 1)
start, no box, one trial, stops when the matching loss stalls). Its L2 error ‖x* - x‖ is compared
with the exact, undamped I2F ‖(J Jᵀ)⁻¹ J δ‖ computed by ``lightning_privacy.leakage``.

1. Ranking at fixed noise: Spearman correlation across faces between attack error and I2F, ‖δ‖,
   and the lower bound ‖J δ‖ / λ_max, at each fixed Gaussian sigma; how many faces the attack
   rebuilds better than a constant image; and the same ranking for the attack started at the
   true face (the solution nearest to it, which the I2F linearises).
2. Calibration: attack error / I2F per noise level (and where it departs from 1).
3. δ along eigenvectors of J Jᵀ (right singular vectors of J), equal ‖δ‖: error vs c / √λ.
4. Initialisation: uniform vs normal vs kaiming vs xavier under the same Gaussian defense.
5. Pruning: I2F of the ``MagnitudePruning`` residual vs the attack on the pruned gradient.
6. Unfairness: predicted PSNR per digit class under one Gaussian defense (I2F only).

The full run uses 12 faces for 1-2 and 10 of them for 3-5 (12 digits per class for 6) with a
modest attack budget: about 160 attacks of a few seconds each on one CPU thread.

    python examples/i2f_fidelity.py           # full run (~30 min on one thread)
    python examples/i2f_fidelity.py --quick   # smoke run
    python examples/i2f_fidelity.py --sections 6   # only check 6
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from scipy.stats import spearmanr

from lightning_privacy.attacks import DeepLeakage
from lightning_privacy.data import load_lfw_tensors
from lightning_privacy.defenses import MagnitudePruning
from lightning_privacy.functional.attacks import deep_leakage
from lightning_privacy.functional.leakage import (
    GramFactorization,
    LeakageOperator,
    PreconditionedGramSolver,
    i2f_from_operator,
    predicted_psnr,
)
from lightning_privacy.leakage import defense_delta
from lightning_privacy.leakage.estimators import ApproximateI2F
from lightning_privacy.models import LeNetDLG

SHAPE = (1, 32, 32)


def build_model(init: str) -> LeNetDLG:
    torch.manual_seed(0)
    return LeNetDLG(num_classes=2, channels=1, image_size=32, init=init).eval()


class Sample:
    """One face: its operator, the factorised J Jᵀ and the clean gradient."""

    def __init__(self, model, x, y, spectrum=False):
        self.model, self.x, self.y = model, x, y
        self.op = LeakageOperator(model, x, y)
        self.fact = GramFactorization(self.op.gram(), spectrum=spectrum)
        self.lam_max = self.fact.lambda_max
        self.g = self.op.gradient
        # error of the face's own mean grey: what a constant guess already achieves (an oracle
        # one: a real attacker does not know the mean). Errors above it reveal nothing.
        self.floor = float((x - x.mean()).norm())

    def i2f(self, delta):
        return float(i2f_from_operator(self.op, delta, factorization=self.fact).value[0])

    def approximate(self, delta):
        """The ``"approximate"`` estimator's I2F of ``delta`` (early-stopped block CG, defaults)."""
        if not hasattr(self, "_solver"):
            settings = ApproximateI2F()
            self._solver = PreconditionedGramSolver.build(
                self.op,
                ratio=settings.prefix_ratio,
                preconditioner=settings.preconditioner,
                tol=settings.tol,
                max_iterations=settings.max_iterations,
                block_size=settings.block_size,
                warn=False,
            )
        return float(self._solver.solve_norms(self.op.jdelta_rows(delta))[0])

    def bound(self, delta):
        return float(self.op.jvp(delta).double().norm()) / self.lam_max

    def observed(self, delta):
        flat = self.g + delta
        return [
            t.reshape(s)
            for t, s in zip(torch.split(flat, self.op.numels), self.op.shapes, strict=True)
        ]

    def attack(self, delta, steps, seed, start=None):
        """L2 error of the attack on the defended gradient. With ``start=self.x`` it starts at
        the true face and finds the solution nearest to it, which is what the I2F linearises
        (the paper's perfect attacker)."""
        options = DeepLeakage(max_iterations=steps, restarts=1, box=None, tol=0.0).options()
        rec = deep_leakage(
            self.model,
            self.observed(delta),
            input_shape=SHAPE,
            num_samples=1,
            labels=self.y,
            generator=torch.Generator().manual_seed(seed),
            start=start,
            **options,
        )
        return float((rec.inputs - self.x).norm())


def psnr(err):
    return float(predicted_psnr(err, math.prod(SHAPE)))


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def rho(a, b):
    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 faces, short attacks")
    parser.add_argument("--faces", type=int, default=12)
    parser.add_argument("--faces-small", type=int, default=10, help="faces for checks 3-5")
    parser.add_argument("--attack-steps", type=int, default=60)
    parser.add_argument("--sections", default="123456", help="which checks to run, e.g. 36")
    args = parser.parse_args()
    sections = args.sections
    torch.set_num_threads(1)
    n_faces = 2 if args.quick else args.faces
    n_small = 2 if args.quick else args.faces_small
    steps = 8 if args.quick else args.attack_steps
    levels = (0.01, 0.1) if args.quick else (0.01, 0.03, 0.05, 0.1, 0.3)
    started = time.perf_counter()

    images, labels = load_lfw_tensors(image_size=32, channels=1)
    faces = torch.nonzero(labels == 1).flatten()[:n_faces].tolist()
    model = build_model("uniform")
    samples = [Sample(model, images[i : i + 1], labels[i : i + 1]) for i in faces]
    d_theta = samples[0].g.numel()
    g_med = statistics.median(float(s.g.norm()) for s in samples)
    print(
        f"# I2F fidelity: sigmoid DLG LeNet, LFW 32x32, {n_faces} faces, label known, "
        f"DeepLeakage L-BFGS <= {steps} steps x 20 evaluations\n"
    )

    if "1" in sections or "2" in sections:
        # 1-2: fixed sigma, ranking and calibration
        rows1, rows2, all_ratios = [], [], []
        for level in levels:
            sigma = level * g_med / math.sqrt(d_theta)  # ‖δ‖ ≈ level x median ‖g‖
            errs, i2fs, norms, bounds, rels, leaks, nearest = [], [], [], [], [], 0, []
            approx = []
            for k, s in enumerate(samples):
                z = torch.randn(d_theta, generator=torch.Generator().manual_seed(1000 + k))
                delta = sigma * z
                errs.append(s.attack(delta, steps, seed=k))
                i2fs.append(s.i2f(delta))
                approx.append(s.approximate(delta))
                norms.append(float(delta.norm()))
                bounds.append(s.bound(delta))
                rels.append(float(delta.norm() / s.g.norm()))
                leaks += errs[-1] < s.floor
                nearest.append(s.attack(delta, steps, seed=k, start=s.x))
            ratios = [e / i for e, i in zip(errs, i2fs, strict=True)]
            all_ratios.append((level, rels, ratios))
            rows1.append(
                [
                    f"{sigma:.2e}",
                    f"{min(rels):.3f}-{max(rels):.3f}",
                    f"{rho(i2fs, errs):.2f}",
                    f"{rho(approx, errs):.2f}",
                    f"{rho(norms, errs):.2f}",
                    f"{rho(bounds, errs):.2f}",
                    f"{statistics.median(b / i for b, i in zip(bounds, i2fs, strict=True)):.1e}",
                    f"{leaks}/{len(errs)}",
                    f"{rho(i2fs, nearest):.2f}",
                    f"{statistics.median(e / i for e, i in zip(nearest, i2fs, strict=True)):.2f}",
                ]
            )
            inside = sum(0.8 <= r <= 1.25 for r in ratios)
            approx_ratios = [e / a for e, a in zip(errs, approx, strict=True)]
            approx_inside = sum(0.8 <= r <= 1.25 for r in approx_ratios)
            of_exact = [a / i for a, i in zip(approx, i2fs, strict=True)]
            rows2.append(
                [
                    f"{sigma:.2e}",
                    f"{min(rels):.3f}-{max(rels):.3f}",
                    f"{statistics.mean(ratios):.2f} ± {statistics.pstdev(ratios):.2f}",
                    f"{min(ratios):.2f}-{max(ratios):.2f}",
                    f"{inside}/{len(ratios)}",
                    f"{statistics.mean(psnr(e) for e in errs):.1f}",
                    f"{statistics.mean(psnr(i) for i in i2fs):.1f}",
                    f"{approx_inside}/{len(approx_ratios)}",
                    f"{min(of_exact):.3f}-{max(of_exact):.3f}",
                ]
            )
        print(
            "## 1. Rank correlation across faces at fixed sigma "
            "(Spearman, attack L2 error vs ...)\n"
        )
        table(
            [
                "sigma",
                "‖δ‖/‖g‖",
                "I2F (exact)",
                "I2F (approximate)",
                "‖δ‖ alone",
                "lower bound",
                "bound / I2F",
                "attack beats a constant image",
                "I2F vs attack from the true face",
                "its error / I2F (median)",
            ],
            rows1,
        )
        floors = [psnr(s.floor) for s in samples]
        print(
            f"A constant image at each face's own mean scores {min(floors):.1f}-"
            f"{max(floors):.1f} dB PSNR: an attack error above that reveals nothing.\n"
        )
        print("## 2. Calibration: attack L2 error ÷ I2F\n")
        table(
            [
                "sigma",
                "‖δ‖/‖g‖",
                "mean ± sd",
                "range",
                "in [0.8, 1.25]",
                "attack PSNR",
                "pred. PSNR",
                "approximate: in [0.8, 1.25]",
                "approximate ÷ exact",
            ],
            rows2,
        )

    if "3" in sections:
        # 3: eigenvector directions
        rows3, pred3, err3 = [], [], []
        for k, i in enumerate(faces[:n_small]):
            s = Sample(model, images[i : i + 1], labels[i : i + 1], spectrum=True)
            lam = s.fact.eigenvalues
            assert lam is not None and s.fact.eigenvectors is not None
            d_x = len(lam)
            picks = [int(q * d_x) for q in (0.75, 0.5, 0.25, 0.05)]  # ascending spectrum
            scale = 2.0 * math.sqrt(float(lam[picks[-1]]))  # largest predicted error 2.0
            for j in picks:
                u = s.fact.eigenvectors[:, j].float()
                v = s.op.jt(u)
                v = v / v.norm()  # right singular vector of J: unit δ direction
                delta = scale * v
                predicted = scale / math.sqrt(float(lam[j]))
                err = s.attack(delta, steps, seed=k)
                pred3.append(predicted)
                err3.append(err)
                rows3.append(
                    [
                        str(i),
                        f"{float(lam[j]):.2e}",
                        f"{predicted:.3f}",
                        f"{s.i2f(delta):.3f}",
                        f"{err:.3f}",
                        f"{err / predicted:.2f}",
                    ]
                )
        print("## 3. δ along eigenvectors of J Jᵀ, equal ‖δ‖: attack error vs c/√λ\n")
        table(["face", "λ", "c/√λ", "I2F", "attack err", "err / (c/√λ)"], rows3)
        slope = _loglog_slope(pred3, err3)
        print(
            f"Spearman(err, c/√λ) = {rho(pred3, err3):.2f}; "
            f"log-log slope = {slope:.2f} (1 = exact)\n"
        )

    if "4" in sections:
        # 4: initialisation
        rows4 = []
        sigma4 = 0.03 * g_med / math.sqrt(d_theta)
        for init in ("uniform", "normal", "kaiming", "xavier"):
            m = build_model(init)
            i2fs, errs = [], []
            for k, i in enumerate(faces[:n_small]):
                s = Sample(m, images[i : i + 1], labels[i : i + 1])
                delta = sigma4 * torch.randn(
                    d_theta, generator=torch.Generator().manual_seed(2000 + k)
                )
                i2fs.append(s.i2f(delta))
                errs.append(s.attack(delta, steps, seed=k))
            rows4.append(
                [
                    init,
                    f"{statistics.mean(i2fs):.3f}",
                    f"{statistics.mean(errs):.3f}",
                    f"{statistics.mean(psnr(i) for i in i2fs):.1f}",
                    f"{statistics.mean(psnr(e) for e in errs):.1f}",
                ]
            )
        print(f"## 4. Initialisation, same Gaussian defense sigma = {sigma4:.2e}\n")
        table(["init", "mean I2F", "mean attack err", "pred. PSNR", "attack PSNR"], rows4)

    if "5" in sections:
        # 5: pruning
        rows5 = []
        for ratio in (0.1, 0.5) if args.quick else (0.1, 0.3, 0.5):
            prune = MagnitudePruning(ratio=ratio)
            i2fs, errs, rels = [], [], []
            for k, s in enumerate(samples[:n_small]):
                grads = [
                    t.reshape(sh)
                    for t, sh in zip(torch.split(s.g, s.op.numels), s.op.shapes, strict=True)
                ]
                delta = torch.cat([d.reshape(-1) for d in defense_delta([prune], grads)])
                i2fs.append(s.i2f(delta))
                errs.append(s.attack(delta, steps, seed=k))
                rels.append(float(delta.norm() / s.g.norm()))
            rows5.append(
                [
                    f"{ratio:.1f}",
                    f"{statistics.mean(rels):.3f}",
                    f"{statistics.mean(i2fs):.3f}",
                    f"{statistics.mean(errs):.3f}",
                    f"{statistics.mean(e / i for e, i in zip(errs, i2fs, strict=True)):.2f}",
                    f"{rho(i2fs, errs):.2f}",
                ]
            )
        print("## 5. Magnitude pruning: I2F of the residual vs the attack on the pruned gradient\n")
        table(
            ["pruned fraction", "‖δ‖/‖g‖", "mean I2F", "mean attack err", "err / I2F", "Spearman"],
            rows5,
        )
    if "6" in sections:
        unfairness(n_faces)

    print(f"total time {time.perf_counter() - started:.0f} s on one CPU thread")


def unfairness(n_per_class: int) -> None:
    """Per-class predicted PSNR on digits under one Gaussian defense (no attack needed)."""
    from lightning_privacy.data import load_digits_tensors
    from lightning_privacy.defenses import GaussianNoise
    from lightning_privacy.leakage import estimate_leakage

    images, labels = load_digits_tensors(image_size=32, channels=1)
    picks = torch.cat([torch.nonzero(labels == c).flatten()[:n_per_class] for c in range(10)])
    torch.manual_seed(0)
    model = LeNetDLG(num_classes=10, channels=1, image_size=32, init="uniform").eval()
    std = 2e-3
    est = estimate_leakage(
        model,
        images[picks],
        labels[picks],
        transforms=[GaussianNoise(std=std)],
        estimator="expected",
    )
    rows = []
    for c in range(10):
        p = est.predicted_psnr[est.targets == c]
        rows.append(
            [str(c), f"{float(p.mean()):.1f}", f"{float(p.min()):.1f}", f"{float(p.max()):.1f}"]
        )
    print(
        f"## 6. Unfairness: predicted PSNR per digit class, GaussianNoise(std={std}), "
        f"{n_per_class} digits per class (expected I2F, no attack)\n"
    )
    table(["class", "mean", "min", "max"], rows)
    print(
        f"batch mean {est.mean_predicted_psnr:.1f} dB; worst class "
        f"{est.worst_class_predicted_psnr:.1f} dB; worst sample "
        f"{est.worst_sample_predicted_psnr:.1f} dB\n"
    )


def _loglog_slope(x, y):
    lx = torch.tensor([math.log(v) for v in x])
    ly = torch.tensor([math.log(max(v, 1e-12)) for v in y])
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


if __name__ == "__main__":
    main()
