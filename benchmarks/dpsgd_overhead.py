"""Step time of DPSGD vs no DP vs Opacus's own ``make_private`` loop, same model, same run.

Model: a small GroupNorm CNN (2 conv + 2 linear, ~0.6 M parameters) on 3x32x32 inputs, batch 64
(Poisson sampling at q = 64/N in every private run), one CPU thread. For each per-sample-gradient
mode (``hooks``, ``functorch``, ``ghost``) it times

* ``Opacus loop``: ``PrivacyEngine().make_private(...)`` and a plain PyTorch loop (Opacus's recipe;
  ghost mode uses the criterion ``make_private`` returns);
* ``DPSGD``: a Lightning ``Trainer`` with ``DPSGD(grad_sample_mode=mode)``;

and, without DP, a plain PyTorch loop and a Lightning ``Trainer``. Step time = CPU time of the
training thread (``time.thread_time``, so other processes on a shared machine do not inflate it)
for forward + backward + optimizer step (data loading excluded), median over the measured steps;
the configurations are
interleaved over ``--rounds`` rounds and the median of the round medians is reported, so load from
other processes hits all of them alike. Ratios are computed from numbers measured in this run.

Usage: ``python benchmarks/dpsgd_overhead.py [--quick] [--steps 30] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_privacy.callbacks import DPSGD

MODES = ("hooks", "functorch", "ghost")
BATCH = 64


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.GroupNorm(8, 32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.GroupNorm(8, 64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def make_data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(
        torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


class Module(L.LightningModule):
    def __init__(self, per_sample: bool = False) -> None:
        super().__init__()
        self.model = make_cnn()
        self.per_sample = per_sample

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        return losses if self.per_sample else losses.mean()  # ghost clipping opt-in

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.thread_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.thread_time() - self._t)


def time_lightning(data, steps: int, warmup: int, mode: str | None) -> float:
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if mode is not None:
        callbacks.insert(0, DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, grad_sample_mode=mode))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + warmup,
        limit_val_batches=0,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    trainer.fit(Module(per_sample=mode == "ghost"), loader)
    return statistics.median(timer.times[warmup:])


def time_loop(data, steps: int, warmup: int, mode: str | None) -> float:
    model = make_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True)
    criterion = nn.CrossEntropyLoss()
    hooks = None
    if mode is not None:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
        out = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            criterion=criterion,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
        )
        if mode == "ghost":
            model, opt, criterion, loader = out
        else:
            model, opt, loader = out
        hooks = model
    times: list[float] = []
    while len(times) < steps + warmup:
        for x, y in loader:
            t0 = time.thread_time()
            opt.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
            times.append(time.thread_time() - t0)
            if len(times) >= steps + warmup:
                break
    if hooks is not None and hasattr(hooks, "_close"):
        hooks._close()
    return statistics.median(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, one round")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = 4, 2, 1
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    data = make_data(BATCH * (args.steps + args.warmup + 2))

    configs = [("loop", None), ("lightning", None)]
    configs += [(kind, mode) for mode in MODES for kind in ("loop", "lightning")]
    results: dict[tuple[str, str | None], list[float]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for kind, mode in configs:
            fn = time_loop if kind == "loop" else time_lightning
            results[(kind, mode)].append(fn(data, args.steps, args.warmup, mode))
    ms = {c: 1000 * statistics.median(v) for c, v in results.items()}

    base_loop, base_pl = ms[("loop", None)], ms[("lightning", None)]
    print(
        f"\nDP-SGD step time, GroupNorm CNN, batch {BATCH}, 1 CPU thread "
        f"({args.steps} steps x {args.rounds} rounds, median)\n"
    )
    header = (
        f"{'mode':<10} {'Opacus loop ms':>14} {'DPSGD ms':>9} {'DPSGD/Opacus':>13} "
        f"{'Opacus/no-DP loop':>18} {'DPSGD/no-DP Lightning':>22}"
    )
    print(header)
    print("-" * len(header))
    print(
        f"{'no DP':<10} {base_loop:>14.1f} {base_pl:>9.1f} {base_pl / base_loop:>12.2f}x "
        f"{1.0:>17.2f}x {1.0:>21.2f}x"
    )
    for mode in MODES:
        lo, pl = ms[("loop", mode)], ms[("lightning", mode)]
        print(
            f"{mode:<10} {lo:>14.1f} {pl:>9.1f} {pl / lo:>12.2f}x {lo / base_loop:>17.2f}x "
            f"{pl / base_pl:>21.2f}x"
        )
    print("\n(no-DP row: 'Opacus loop' = plain PyTorch loop, 'DPSGD' = plain Lightning Trainer.)")


if __name__ == "__main__":
    main()
