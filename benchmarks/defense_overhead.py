"""Step-time overhead of GradientDefense: each defense vs none, and the DDP comm hook.

Part 1 (one process): ResNet-18 (CIFAR stem) on 32x32 inputs, batch 64, SGD. One ``Trainer.fit``
runs every configuration *interleaved step by step* (round r, configuration k: step r*K + k; the
order is shuffled each round), so machine noise hits all of them alike. A step is timed from
``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, defense, optimizer step);
the table shows the median per configuration and its ratio to "none" ("measured ratio"). On a
shared, loaded machine the step-to-step noise can exceed the defense's cost, so the time spent
inside the defense itself (``on_before_optimizer_step`` / the comm hook) is also measured on the
same steps and reported as "implied ratio" = (median baseline step + median defense time) /
median baseline step.

Part 2 (2 CPU processes, gloo): the same model under DDP, default all-reduce (no callback)
vs ``GradientDefense(placement="local")`` (our comm hook), fits alternating in one launch,
per-rank batch 32 (global 64). Ratios of the median step time of rank 0.

With ``--device cuda`` part 1 runs on one GPU (``accelerator="gpu"``, each timing point after
``torch.cuda.synchronize``) and part 2 on every GPU present, one process each, over NCCL
(per-rank batch 32; skipped, with the reason printed, on fewer than 2 GPUs). There "ms in
defense" of the comm hook is host time: synchronising inside the hook would serialise backward.

Usage::

    python benchmarks/defense_overhead.py                  # full run (several minutes on CPU)
    python benchmarks/defense_overhead.py --quick          # smoke run (batch 8, few steps)
    python benchmarks/defense_overhead.py --device cuda    # the same tables on GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_privacy.callbacks import GradientDefense
from lightning_privacy.defenses import (
    GaussianNoise,
    GradientClipping,
    LaplaceNoise,
    LowRankFiltering,
    MagnitudePruning,
    RandomPruning,
)
from lightning_privacy.models import resnet18_cifar

warnings.filterwarnings("ignore")

CONFIGS = {
    "none": None,
    "gaussian_noise(std=1e-3)": [GaussianNoise(std=1e-3)],
    "gaussian_noise, drawn in the hook": [GaussianNoise(std=1e-3)],
    "laplace_noise(scale=1e-3)": [LaplaceNoise(scale=1e-3)],
    "laplace_noise, drawn in the hook": [LaplaceNoise(scale=1e-3)],
    "gradient_clipping(C=1)": [GradientClipping(max_norm=1.0)],
    "clipping + gaussian (formal)": [GradientClipping(max_norm=1.0), GaussianNoise(std=1e-3)],
    "magnitude_pruning(0.9, per_tensor)": [MagnitudePruning(ratio=0.9)],
    "magnitude_pruning(0.9, global)": [MagnitudePruning(ratio=0.9, scope="global")],
    "random_pruning(0.5)": [RandomPruning(ratio=0.5)],
    "low_rank(rank=4)": [LowRankFiltering(rank=4)],
}
# GradientDefense(draw_noise_ahead=False): the noise is drawn inside on_before_optimizer_step
# instead of in a background thread during the forward/backward pass (the cost with no spare core)
IN_HOOK = {"gaussian_noise, drawn in the hook", "laplace_noise, drawn in the hook"}
TARGETS = {
    "gaussian_noise(std=1e-3)": 1.03,
    "laplace_noise(scale=1e-3)": 1.03,
    "magnitude_pruning(0.9, per_tensor)": 1.10,
    "magnitude_pruning(0.9, global)": 1.10,
    "comm hook + gaussian_noise": 1.05,
    "comm hook, std=0": 1.05,
}


def sync(device: str) -> None:
    """Waits for the GPU's queued work, so a timing point sees it finished (no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def device_label(device: str) -> str:
    """``cpu``, or ``cuda (NVIDIA ...)`` with the name of the GPU in use."""
    return f"cuda ({torch.cuda.get_device_name()})" if device == "cuda" else "cpu"


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = resnet18_cifar(num_classes=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Interleaved(L.Callback):
    """Forwards to one GradientDefense per step (cycling through them) and times every step."""

    def __init__(self, configs, rounds, warmup, seed=0, device="cpu"):
        self.device = device
        self.defenses = {
            name: None
            if t is None
            else GradientDefense(t, seed=0, draw_noise_ahead=name not in IN_HOOK)
            for name, t in configs.items()
        }
        rng = random.Random(seed)
        names = list(configs)
        self.schedule = ["none"] * warmup
        for _ in range(rounds):
            rng.shuffle(names)
            self.schedule += names
        self.warmup = warmup
        self.times: dict[str, list[float]] = {n: [] for n in configs}
        self.defense_times: dict[str, list[float]] = {n: [] for n in configs}
        self.step = 0

    def _all(self, hook, *args):
        for d in self.defenses.values():
            if d is not None:
                getattr(d, hook)(*args)

    def setup(self, trainer, pl_module, stage):
        self._all("setup", trainer, pl_module, stage)

    def on_fit_start(self, trainer, pl_module):
        self._all("on_fit_start", trainer, pl_module)

    def on_train_start(self, trainer, pl_module):
        self._all("on_train_start", trainer, pl_module)
        # Each defense sees only its own steps here; its raw-step guard would refuse the others
        # (they are steps of the same Trainer, defended by another defense or by none).
        for d in self.defenses.values():
            if d is not None:
                d._guard.detach()

    def teardown(self, trainer, pl_module, stage):
        self._all("teardown", trainer, pl_module, stage)

    def _active(self):
        return self.defenses[self.schedule[self.step]]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(self.device)
        self.t0 = time.perf_counter()
        active = self._active()
        if active is not None:  # starts the background draw of the step's noise
            active.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        active = self._active()
        sync(self.device)
        t0 = time.perf_counter()
        if active is not None:
            active.on_before_optimizer_step(trainer, pl_module, optimizer)
        sync(self.device)
        self.defense_dt = time.perf_counter() - t0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        active = self._active()
        if active is not None:
            active.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        sync(self.device)
        dt = time.perf_counter() - self.t0
        if self.step >= self.warmup:
            self.times[self.schedule[self.step]].append(dt)
            self.defense_times[self.schedule[self.step]].append(self.defense_dt)
        self.step += 1


def loader(n, batch_size, size):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer_kwargs(device="cpu", **kw):
    return dict(
        accelerator="gpu" if device == "cuda" else "cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def single_process(batch_size, rounds, warmup, device="cpu"):
    timer = Interleaved(CONFIGS, rounds=rounds, warmup=warmup, device=device)
    steps = len(timer.schedule)
    kwargs = trainer_kwargs(device)
    trainer = L.Trainer(devices=1, max_steps=steps, callbacks=[timer], **kwargs)
    trainer.fit(Classifier(), loader(steps * batch_size, batch_size, 32))
    return timer.times, timer.defense_times


def ddp_worker(out, batch_size, rounds, steps, device="cpu"):
    """Runs in 2 CPU processes or one per GPU (Lightning relaunches this script with the same
    arguments)."""
    from lightning.pytorch.strategies import DDPStrategy

    processes = ddp_processes(device)

    torch.set_num_threads(1)
    variants = {
        "default all-reduce": None,
        "comm hook, std=0": [GaussianNoise(std=0.0)],
        "comm hook + gaussian_noise": [GaussianNoise(std=1e-3)],
        "comm hook + clipping (global view)": [GradientClipping(max_norm=1.0)],
    }
    times: dict[str, list[float]] = {n: [] for n in variants}
    hook_times: dict[str, list[float]] = {n: [] for n in variants}
    order = list(variants)
    for r in range(rounds):
        random.Random(r).shuffle(order)
        for name in order:
            defense = None
            if variants[name] is not None:
                defense = TimedDefense(variants[name], placement="local", seed=0)
            timer = StepTimer(warmup=1, defense=defense, device=device)
            callbacks = [timer] if defense is None else [defense, timer]
            trainer = L.Trainer(
                devices=processes,
                strategy=DDPStrategy(process_group_backend="nccl" if device == "cuda" else "gloo"),
                max_steps=steps + 1,
                callbacks=callbacks,
                **trainer_kwargs(device),
            )
            n = processes * (steps + 1) * batch_size
            trainer.fit(Classifier(), loader(n, batch_size, 32))
            times[name] += timer.times
            hook_times[name] += timer.hook_times
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump({"times": times, "defense_times": hook_times}, f)


class TimedDefense(GradientDefense):
    """Adds up the time spent inside the communication hook (wraps the local placement)."""

    hook_time = 0.0

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        placement = self._placement
        defend = placement.defend_bucket

        def timed(bucket):
            t0 = time.perf_counter()
            future = defend(bucket)
            self.hook_time += time.perf_counter() - t0
            return future

        placement.defend_bucket = timed


class StepTimer(L.Callback):
    def __init__(self, warmup, defense=None, device="cpu"):
        self.warmup, self.times, self.hook_times, self.step = warmup, [], [], 0
        self.defense, self.device = defense, device

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.defense is not None:
            self.defense.hook_time = 0.0
        sync(self.device)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(self.device)
        if self.step >= self.warmup:
            self.times.append(time.perf_counter() - self.t0)
            self.hook_times.append(0.0 if self.defense is None else self.defense.hook_time)
        self.step += 1


def ddp_processes(device: str) -> int:
    """2 CPU processes, or one per GPU present."""
    return torch.cuda.device_count() if device == "cuda" else 2


def summarize(times, defense_times, baseline):
    """Rows: step-time median/IQR, measured ratio, time inside the defense, implied ratio."""
    base = statistics.median(times[baseline])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [med, med, med]
        inside = statistics.median(defense_times[name])
        target = TARGETS.get(name)
        rows.append(
            (
                name,
                f"{1000 * med:.0f}",
                f"{1000 * q[0]:.0f}-{1000 * q[2]:.0f}",
                f"{med / base:.3f}x",
                f"{1000 * inside:.1f}",
                f"{(base + inside) / base:.3f}x",
                "" if target is None else f"<= {target:.2f}x",
                len(ts),
            )
        )
    return rows


def print_table(title, rows):
    header = (
        "configuration",
        "median ms/step",
        "IQR ms",
        "measured ratio",
        "ms in defense",
        "implied ratio",
        "target",
        "n",
    )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8, few steps")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (part 1)")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu or cuda")
    parser.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (the default is cpu)")
    batch = 8 if args.quick else 64
    if args.ddp_worker is not None:
        rounds = args.rounds or (1 if args.quick else 4)
        steps = 2 if args.quick else 3
        ddp_worker(args.ddp_worker, batch // 2, rounds, steps=steps, device=args.device)
        return
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 7)
    print(
        f"torch {torch.__version__}, lightning {L.__version__}, {args.threads} thread(s), "
        f"ResNet-18 (CIFAR stem) 32x32, batch {batch}, {rounds} interleaved rounds, "
        f"device {device_label(args.device)}"
    )
    times, defense_times = single_process(batch, rounds, warmup=2, device=args.device)
    title = f"One process, batch {batch}, on {device_label(args.device)}"
    print_table(title, summarize(times, defense_times, "none"))
    if args.skip_ddp:
        return
    processes = ddp_processes(args.device)
    if processes < 2:
        print(f"\nDDP part skipped: {processes} GPU present, DDP over NCCL needs at least 2")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--ddp-worker", out]
        cmd += ["--device", args.device]
        if args.quick:
            cmd.append("--quick")
        if args.rounds:
            cmd += ["--rounds", str(args.rounds)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL)
        with open(out) as f:
            ddp = json.load(f)
    if args.device == "cuda":
        where = f"{processes} GPUs (NCCL), {device_label(args.device)}"
    else:
        where = "2 CPU processes (gloo)"
    title = f"DDP, {where}, per-rank batch {batch // 2}, rank 0"
    print_table(title, summarize(ddp["times"], ddp["defense_times"], "default all-reduce"))


if __name__ == "__main__":
    main()
