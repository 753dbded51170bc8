"""Our DLG and Inverting Gradients against Breaching's on the same model, image, seed.

Breaching (``pip install -e ".[benchmark]"``, PyPI ``breaching==0.1.2``) is driven through its
attack API with a server payload and shared data built here from our model, image and gradient
-- no case, dataset or download: ``breaching.attacks.prepare_attack(model, loss, cfg_attack)``
then ``attacker.reconstruct(server_payload, shared_data, {})``. Both sides use one CPU thread,
the same seed, labels not given, and are scored by the same ``reconstruction_metrics``.

* DLG: sigmoid LeNet with U(-0.5, 0.5) weights (100-class head), LFW faces at 32 px. Breaching's
  ``deepleakage`` preset (L-BFGS lr 1, randn start, 1,200 steps); ours: ``DeepLeakage()``
  (L-BFGS with strong-Wolfe line search, start in [0, 1], up to 4 restarts x 300 steps = the same
  1,200-step budget, stopping at a relative matching loss of 1e-8).
* Inverting Gradients, time to quality: CIFAR-style ResNet-18 in eval mode and the sigmoid LeNet
  (3 channels, 100 classes), ``--images`` 32 px photo patches each. Breaching's
  ``invertinggradients`` preset runs ``--ig-iterations`` (2,000); ours is
  ``InvertingGradients.fast()``. Both keep their best iterate, which is traced against wall time
  (Breaching's by wrapping its ``_compute_objective``, which changes nothing it computes; ours
  through the ``callback`` of ``inverting_gradients``). The table gives the seconds each side
  needs to reach Breaching's final PSNR and the ratio; the curves go to ``--curve`` (PNG). On
  the LeNet our paper preset at the same iterations is traced too. Breaching's TV prior needs
  three channels, hence the RGB LeNet. Both sides are warmed up once (a 3-step run) first.

Usage: ``python benchmarks/attack_vs_breaching.py [--quick] [--faces 5] [--images 3]
[--skip-dlg] [--ig-iterations 2000] [--curve docs/ig_time_to_quality.png]`` (the full run takes
about an hour on one thread, most of it Breaching on ResNet-18; ``--jobs 4`` measures four
images at a time, each in its own single-threaded process).

``--device cuda``: models, images and gradients on the GPU for both sides (Breaching's
``setup`` gets that device; ours runs under ``with torch.device("cuda")`` with a CUDA generator,
so its random starts are drawn there), each time point taken after ``torch.cuda.synchronize``;
the tables are the same and name the GPU.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lightning_privacy.attacks import DeepLeakage, InvertingGradients
from lightning_privacy.data import load_lfw_tensors, load_photo_patches
from lightning_privacy.functional.attacks import (
    inverting_gradients,
    observed_gradients_of,
    restore_labels,
)
from lightning_privacy.metrics import reconstruction_metrics
from lightning_privacy.models import LeNetDLG, resnet18_cifar

console = Console(width=140)
CPU = torch.device("cpu")


def sync(device: torch.device) -> None:
    """Waits for queued GPU work before a time point (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def where(device: torch.device) -> str:
    """``one CPU thread``, or the GPU's name, for titles and axis labels."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return "one CPU thread"


class _Meta(dict):
    """Breaching reads its metadata both as ``meta.key`` and ``meta["key"]``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err


class _BestTrace:
    """Breaching's kept candidate after every iteration, with its wall time.

    Breaching keeps the candidate after a step whose objective (taken before that step) is the
    smallest so far; wrapping ``_compute_objective`` sees both, so this replays that rule without
    changing what Breaching computes.
    """

    def __init__(self, attacker) -> None:
        self.points: list[tuple[float, torch.Tensor]] = []
        self.best, self.best_x, self.last = float("inf"), None, float("inf")
        self.started = time.perf_counter()
        original = attacker._compute_objective

        def wrapped(candidate, labels, rec_model, optimizer, shared_data, iteration):
            self.step(candidate)
            closure = original(candidate, labels, rec_model, optimizer, shared_data, iteration)

            def traced():
                value = closure()
                self.last = float(value.detach())
                return value

            return traced

        attacker._compute_objective = wrapped

    def step(self, candidate: torch.Tensor) -> None:
        if self.best_x is None or self.last < self.best:
            self.best, self.best_x = min(self.best, self.last), candidate.detach().clone()
        sync(candidate.device)
        self.points.append((time.perf_counter() - self.started, self.best_x))


def breaching_attack(
    name: str,
    model,
    grads,
    shape,
    classes: int,
    iterations: int | None,
    seed: int,
    num_samples: int = 1,
    trace: bool = False,
    device: torch.device | None = None,
):
    """Run Breaching's preset ``name`` on our gradient.

    Returns ``(inputs, labels, seconds, points)``; ``points`` is ``[(seconds, kept inputs)]``
    after every iteration when ``trace`` (else empty), plus the returned result at the end.
    """
    import breaching

    logging.getLogger("breaching").setLevel(logging.WARNING)
    overrides = [] if iterations is None else [f"optim.max_iterations={iterations}"]
    cfg = breaching.get_attack_config(name, overrides=overrides)
    device = device or torch.device("cpu")
    setup = dict(device=device, dtype=torch.float)
    attacker = breaching.attacks.prepare_attack(model, torch.nn.CrossEntropyLoss(), cfg, setup)
    meta = _Meta(shape=tuple(shape), modality="vision", task="classification", classes=classes)
    payload = [
        dict(
            parameters=[p.detach().clone() for p in model.parameters()],
            buffers=[b.detach().clone() for b in model.buffers()],
            metadata=meta,
        )
    ]
    shared = [
        dict(
            gradients=[g.clone() for g in grads],
            buffers=None,
            metadata=dict(num_data_points=num_samples, labels=None, local_hyperparams=None),
        )
    ]
    torch.manual_seed(seed)
    tracer = _BestTrace(attacker) if trace else None
    sync(device)
    start = time.perf_counter()
    if tracer is not None:
        tracer.started = start
    rec, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
    sync(device)
    seconds = time.perf_counter() - start
    labels = rec["labels"]
    labels = labels.argmax(-1) if labels.dim() > 1 else labels
    data = rec["data"].detach()
    points = [] if tracer is None else [*tracer.points, (seconds, data)]
    return data, labels.reshape(-1), seconds, points


def row(table: Table, case: str, ours, theirs, truth) -> tuple[float, float]:
    x, y = (t.cpu() for t in truth)
    ours = (ours[0].cpu(), ours[1].cpu(), ours[2])
    theirs = None if theirs is None else (theirs[0].cpu(), theirs[1].cpu(), theirs[2])
    s_ours = reconstruction_metrics(ours[0], (x, y))
    s_ours["label_acc"] = float(ours[1].reshape(-1)[0] == y[0])
    if theirs is None:
        table.add_row(
            case,
            f"{s_ours['psnr']:.1f}",
            "n/a",
            str(int(s_ours["label_acc"])),
            "n/a",
            f"{ours[2]:.1f}",
            "n/a",
            "n/a",
        )
        return ours[2], float("nan")
    s_theirs = reconstruction_metrics(theirs[0], (x, y))
    s_theirs["label_acc"] = float(theirs[1].reshape(-1)[0] == y[0])
    table.add_row(
        case,
        f"{s_ours['psnr']:.1f}",
        f"{s_theirs['psnr']:.1f}",
        "yes" if s_ours["label_acc"] else "no",
        "yes" if s_theirs["label_acc"] else "no",
        f"{ours[2]:.1f}",
        f"{theirs[2]:.1f}",
        f"{ours[2] / theirs[2]:.2f}",
    )
    return ours[2], theirs[2]


def new_table(title: str) -> Table:
    table = Table(title=title)
    for col in (
        "case",
        "PSNR ours",
        "PSNR Breaching",
        "label ours",
        "label Breaching",
        "s ours",
        "s Breaching",
        "time ratio",
    ):
        table.add_column(col, justify="right")
    return table


def dlg_section(args, have_breaching: bool) -> None:
    device = torch.device(args.device)
    faces, labels = load_lfw_tensors(image_size=32, channels=1)
    faces, labels = faces.to(device), labels.to(device)
    picks = [0, 17, 35, 52, 71][: args.faces]
    table = new_table(
        f"DLG, LeNet U(-0.5, 0.5), LFW faces 32 px, labels not given, "
        f"budget {args.dlg_iterations} L-BFGS steps, {where(device)}"
    )
    ours_total = theirs_total = 0.0
    ours_dlg = DeepLeakage(max_iterations=args.dlg_iterations // 4, restarts=4)
    for i in picks:
        torch.manual_seed(1234)
        model = LeNetDLG(num_classes=100, channels=1, image_size=32, init="uniform").to(device)
        x, y = faces[i : i + 1], labels[i : i + 1]
        grads = observed_gradients_of(model, x, y)
        sync(device)
        start = time.perf_counter()
        with torch.device(device):  # our dummies on the model's device
            rec = ours_dlg.reconstruct(
                model,
                grads,
                input_shape=(1, 32, 32),
                num_samples=1,
                generator=torch.Generator(device=device).manual_seed(args.seed),
            )
        sync(device)
        ours = (rec.inputs, rec.labels, time.perf_counter() - start)
        theirs = None
        if have_breaching:
            theirs = breaching_attack(
                "deepleakage",
                model,
                grads,
                (1, 32, 32),
                100,
                args.dlg_iterations,
                args.seed,
                device=device,
            )
        a, b = row(table, f"face {i}", ours, theirs, (x, y))
        ours_total, theirs_total = ours_total + a, theirs_total + b
    if have_breaching and theirs_total > 0:
        table.caption = f"total time ratio ours/Breaching: {ours_total / theirs_total:.2f}"
    if picks:
        console.print(table)


def ig_victim(model_name: str, index: int, device: torch.device):
    """``(model, x, y, gradient, classes)`` for one photo patch, all on ``device``."""
    patches, labels = load_photo_patches(image_size=32, channels=3, patches_per_photo=1)
    x, y = patches[index : index + 1].to(device), labels[index : index + 1].to(device)
    if model_name == "ResNet-18 (eval)":
        torch.manual_seed(0)
        model, classes = resnet18_cifar(num_classes=10, channels=3).eval(), 10
    else:
        torch.manual_seed(1234)
        model = LeNetDLG(num_classes=100, channels=3, image_size=32, init="uniform")
        classes = 100
    model = model.to(device)
    return model, x, y, observed_gradients_of(model, x, y), classes


class _ReachedTargetError(Exception):
    """The kept iterate reached the target PSNR (``--stop-at-target``: a measurement shortcut)."""


def ours_ig(attack: InvertingGradients, model, grads, seed: int, truth=None, target=None):
    """Our attack with its best iterate traced: ``(inputs, labels, seconds, points, stopped)``.

    With ``target``, the run stops once the kept iterate's PSNR against ``truth`` reaches it
    (the check costs microseconds per step); ``labels`` is then ``None``.
    """
    points: list[tuple[float, torch.Tensor]] = []
    device = grads[0].device
    sync(device)
    start = time.perf_counter()

    def trace(step: int, objective: float, inputs: torch.Tensor) -> None:
        sync(device)
        points.append((time.perf_counter() - start, inputs))
        if target is not None and psnr_curve(points[-1:], truth)[0][1] >= target:
            raise _ReachedTargetError

    try:
        with torch.device(device):  # the dummies on the model's device
            rec = inverting_gradients(
                model,
                grads,
                input_shape=(3, 32, 32),
                num_samples=1,
                generator=torch.Generator(device=device).manual_seed(seed),
                callback=trace,
                **attack.options(),
            )
    except _ReachedTargetError:
        return points[-1][1], None, points[-1][0], points, True
    sync(device)
    seconds = time.perf_counter() - start
    return rec.inputs, rec.labels, seconds, [*points, (seconds, rec.inputs)], False


def psnr_curve(points, truth: torch.Tensor) -> list[tuple[float, float]]:
    """``[(seconds, PSNR)]`` of traced iterates (clamped to [0, 1], as the metrics do)."""
    curve = []
    for seconds, inputs in points:
        mse = float(((inputs.clamp(0, 1) - truth) ** 2).mean())
        curve.append((seconds, 200.0 if mse <= 1e-20 else 10 * math.log10(1 / mse)))
    return curve


def time_to(curve: list[tuple[float, float]], psnr: float) -> float:
    """First traced time at which the kept iterate reaches ``psnr`` (``nan``: never)."""
    return next((t for t, p in curve if p >= psnr), float("nan"))


IG_MODELS = ("LeNet (sigmoid, RGB)", "ResNet-18 (eval)")


def warm_up(have_breaching: bool, models=IG_MODELS, device=CPU) -> None:
    """One 3-step run of each side per model, so no first-call cost lands in a measurement."""
    for model_name in models:
        model, x, _, grads, classes = ig_victim(model_name, 0, device)
        ours_ig(InvertingGradients.fast(max_iterations=3), model, grads, 0, x, 99.0)
        ours_ig(InvertingGradients(max_iterations=3), model, grads, 0)
        if have_breaching:
            breaching_attack(
                "invertinggradients", model, grads, (3, 32, 32), classes, 3, 0, device=device
            )


IG_COLUMNS = (
    "case",
    "PSNR Breaching",
    "s Breaching",
    "PSNR ours",
    "s ours (run)",
    "s ours to Breaching's PSNR",
    "time-to-quality ratio",
    "run-time ratio",
    "labels ours / Br.",
)


def ig_case(args, model_name: str, index: int, have_breaching: bool, curves: dict) -> list:
    """One image: both attacks traced; the table row's cells.

    For a model named in ``--stop-at-target`` Breaching runs first and ours stops once it
    reaches Breaching's final PSNR (its time to quality; its own final PSNR and run time are then
    not measured).
    """
    device = torch.device(args.device)
    model, x, y, grads, classes = ig_victim(model_name, index, device)
    stop = have_breaching and any(k and k in model_name for k in args.stop_at_target.split(","))
    theirs = None
    if have_breaching:
        theirs = breaching_attack(
            "invertinggradients",
            model,
            grads,
            (3, 32, 32),
            classes,
            args.ig_iterations,
            args.seed,
            trace=True,
            device=device,
        )
        label = f"Breaching, {args.ig_iterations} it."
        curves.setdefault((model_name, label), []).append(psnr_curve(theirs[3], x))
    target = (
        reconstruction_metrics(theirs[0].cpu(), x.cpu())["psnr"] if theirs is not None else None
    )
    fast_options = {} if args.fast_iterations is None else {"max_iterations": args.fast_iterations}
    fast = ours_ig(
        InvertingGradients.fast(**fast_options),
        model,
        grads,
        args.seed,
        x,
        target if stop else None,
    )
    fast_curve = psnr_curve(fast[3], x)
    curves.setdefault((model_name, "ours: InvertingGradients.fast()"), []).append(fast_curve)
    if "LeNet" in model_name:
        paper = ours_ig(InvertingGradients(max_iterations=args.ig_iterations), model, grads, 0)
        key = (model_name, f"ours: paper preset, {args.ig_iterations} it.")
        curves.setdefault(key, []).append(psnr_curve(paper[3], x))
    labels = fast[1] if fast[1] is not None else restore_labels(model, grads, 1)
    ours_label = "yes" if int(labels[0]) == int(y[0]) else "no"
    psnr = "" if fast[4] else f"{reconstruction_metrics(fast[0].cpu(), x.cpu())['psnr']:.2f}"
    ours_psnr = psnr or "stopped"
    ours_run = "stopped" if fast[4] else f"{fast[2]:.1f}"
    if theirs is None or target is None:
        return [f"{model_name}, patch {index}", "n/a", "n/a", ours_psnr, ours_run]
    reach = time_to(fast_curve, target)
    return [
        f"{model_name}, patch {index}",
        f"{target:.2f}",
        f"{theirs[2]:.1f}",
        ours_psnr,
        ours_run,
        f"{reach:.1f}" if math.isfinite(reach) else "never",
        f"{reach / theirs[2]:.3f}" if math.isfinite(reach) else "missed",
        "-" if fast[4] else f"{fast[2] / theirs[2]:.3f}",
        f"{ours_label} / {'yes' if int(theirs[1][0]) == int(y[0]) else 'no'}",
    ]


def _run_case(args, model_name: str, index: int, have_breaching: bool) -> tuple[list, dict]:
    """One image in a fresh worker: warm up on that model, then both attacks traced."""
    torch.set_num_threads(1)
    warm_up(have_breaching, models=(model_name,), device=torch.device(args.device))
    curves: dict = {}
    return ig_case(args, model_name, index, have_breaching, curves), curves


def ig_section(args, have_breaching: bool) -> None:
    """All images of both models, ``--jobs`` of them at a time, each in its own process.

    A worker times both sides of its image one after the other, so every ratio is measured side
    by side in one process; with more workers than free cores both sides slow down together.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    # the first image of the costly model first, then the cheap model, then the rest
    first, *rest = [(IG_MODELS[-1], i) for i in range(args.images)]
    cases = [first, *((m, i) for m in IG_MODELS[:-1] for i in range(args.images)), *rest]
    if args.only:  # e.g. "ResNet:1,2": a subset of the cases, for a second concurrent run
        name, _, picks = args.only.partition(":")
        wanted = {int(i) for i in picks.split(",")} if picks else set(range(args.images))
        cases = [(m, i) for m, i in cases if name in m and i in wanted]
    results: dict = {}
    curves: dict = {}
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_case, args, m, i, have_breaching): (m, i) for m, i in cases}
        for future in as_completed(futures):
            cells, case_curves = future.result()
            results[futures[future]] = cells
            for key, lines in case_curves.items():
                curves.setdefault(key, []).extend(lines)
            console.print(" | ".join(cells), style="dim")
            if args.curve:
                plot_curves(curves, args.curve, where(torch.device(args.device)))
    table = Table(
        title=f"Inverting Gradients, time to quality: Breaching's preset at {args.ig_iterations} "
        "iterations vs InvertingGradients.fast(), 32 px patches, labels not given, "
        + where(torch.device(args.device))
    )
    for col in IG_COLUMNS:
        table.add_column(col, justify="right")
    worst: dict[str, float] = {}
    for model_name in IG_MODELS:
        for index in range(args.images):
            if (model_name, index) not in results:
                continue
            cells = results[(model_name, index)]
            table.add_row(*cells)
            if len(cells) > 6:
                ratio = float(cells[6]) if cells[6] != "missed" else math.inf
                worst[model_name] = max(worst.get(model_name, 0.0), ratio)
    if worst:
        table.caption = "worst time-to-quality ratio: " + ", ".join(
            f"{name} {value:.3f}" for name, value in worst.items()
        )
    console.print(table)
    if args.curve:
        console.print(f"curves: {args.curve}")


def plot_curves(curves: dict, path: str, device: str = "one CPU thread") -> None:
    """PSNR against wall time, one panel per model, one colour per method, one line per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(model for model, _ in curves))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    colours = {}
    for (model, method), lines in curves.items():
        ax = axes[0][models.index(model)]
        colour = colours.setdefault(method, f"C{len(colours)}")
        for k, line in enumerate(lines):
            ts, ps = zip(*line, strict=True)
            ax.plot(ts, ps, color=colour, alpha=0.85, lw=1.2, label=method if k == 0 else None)
        ax.set_title(model)
        ax.set_xscale("log")
        ax.set_xlabel(f"wall time (s, {device})")
        ax.set_ylabel("PSNR of the kept iterate (dB)")
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    import json
    from pathlib import Path

    data = [{"model": m, "method": k, "lines": lines} for (m, k), lines in curves.items()]
    Path(path).with_suffix(".json").write_text(json.dumps(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 face, tiny budgets")
    parser.add_argument("--faces", type=int, default=5)
    parser.add_argument("--images", type=int, default=3, help="patches per model for IG")
    parser.add_argument("--skip-dlg", action="store_true")
    parser.add_argument("--dlg-iterations", type=int, default=1200, help="Breaching's L-BFGS steps")
    parser.add_argument("--ig-iterations", type=int, default=2000, help="Breaching's IG steps")
    parser.add_argument("--fast-iterations", type=int, default=None, help="cap ours (smoke)")
    parser.add_argument("--curve", default="docs/ig_time_to_quality.png", help="PNG ('' = none)")
    parser.add_argument("--jobs", type=int, default=1, help="IG images measured at a time")
    parser.add_argument("--only", default="", help="cases MODEL[:i,j], e.g. ResNet:1,2")
    parser.add_argument(
        "--stop-at-target",
        default="",
        help="models (e.g. ResNet) whose run of ours stops at Breaching's final PSNR",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu or cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (the default is cpu)")
    torch.set_num_threads(1)
    if args.quick:
        args.faces, args.images, args.dlg_iterations, args.ig_iterations = 1, 1, 60, 20
        args.fast_iterations = 20
    try:
        import breaching  # noqa: F401

        have_breaching = True
    except Exception as err:
        console.print(
            f"[yellow]Breaching unavailable ({type(err).__name__}: {err}); our side only."
        )
        have_breaching = False
    if not args.skip_dlg:
        dlg_section(args, have_breaching)
    ig_section(args, have_breaching)


if __name__ == "__main__":
    main()
