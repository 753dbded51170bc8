"""Run GradientDefense scenarios under 2-process DDP (gloo, CPU); rank 0 writes a JSON report.

Launched by ``test_gradient_defense_ddp.py`` as ``python this.py OUT.json SCENARIO [SCENARIO ...]``
(through ``ddp_launch``, which puts ``tests/`` on ``PYTHONPATH`` for ``helpers``). Lightning's
subprocess launcher re-runs this script for rank 1.

Per step, every rank computes its own clean gradient (``parameter_gradients``, no side effects)
and the expected defended average where it is deterministic; after the step the actual update
(SGD, lr=1) is compared with it. The noise in the update is ``-update - clean_average``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import (
    PLAIN_MLP,
    BoringModel,
    all_ranks_equal,
    ddp_trainer_kwargs,
    end_ddp,
    fit,
    flat_parameters,
    loader,
    random_tensors,
)
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_privacy.callbacks import GradientDefense
from lightning_privacy.defenses import (
    GaussianNoise,
    GradientClipping,
    MagnitudePruning,
    apply_transforms,
)
from lightning_privacy.functional import parameter_gradients

torch.set_num_threads(1)
warnings.filterwarnings("ignore")
STD = 0.1


NET = dict(PLAIN_MLP, input_shape=(32,), width=64, num_classes=4)


class CountingDefense(GradientDefense):
    """Counts communication-hook calls per bucket index (wraps the local placement's defence)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook_calls: list[int] = []

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        placement = self._placement
        defend = placement.defend_bucket

        def counted(bucket):
            self.hook_calls.append(bucket.index())
            return defend(bucket)

        placement.defend_bucket = counted


class Probe(L.Callback):
    """Clean gradients, expected defended averages, updates, and a replica comparison."""

    def __init__(self, expected_fn=None):
        self.expected_fn = expected_fn
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        grads = parameter_gradients(pl_module, x, y, loss_fn=F.cross_entropy)
        names = list(grads)
        clean = torch.cat([g.flatten() for g in grads.values()])
        dist.all_reduce(clean)
        record = {"names": names, "clean": clean / dist.get_world_size()}
        if self.expected_fn is not None:
            local = self.expected_fn(list(grads.values()))
            expected = torch.cat([g.flatten() for g in local])
            dist.all_reduce(expected)
            record["expected"] = expected / dist.get_world_size()
        record["before"] = flat_parameters(pl_module)
        self.steps.append(record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["update"] = flat_parameters(pl_module) - self.steps[-1]["before"]

    def on_train_end(self, trainer, pl_module):
        self.replicas_identical = all_ranks_equal(flat_parameters(pl_module))
        self.epochs = [None] * dist.get_world_size()
        dist.all_gather_object(self.epochs, trainer.current_epoch)


def segments(module):
    out, start = {}, 0
    for n, p in module.named_parameters():
        out[n] = (start, start + p.numel())
        start += p.numel()
    return out


def data():
    return loader(*random_tensors(64, (32,), num_classes=4, seed=1, normal=True), batch_size=8)


def run(
    name, defense, *, steps=2, expected_fn=None, bucket_cap_mb=None, manual=False, **trainer_kw
):
    probe = Probe(expected_fn)
    strategy_kw = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
    trainer, module = fit(
        ddp_trainer_kwargs(**strategy_kw),
        [defense, probe] if defense is not None else [probe],
        BoringModel(**NET, manual=manual),
        data(),
        max_steps=steps,
        num_sanity_val_steps=0,
        **trainer_kw,
    )
    seg = segments(module)
    report = {"replicas_identical": probe.replicas_identical, "steps": [], "epochs": probe.epochs}
    if "privacy/epsilon" in trainer.callback_metrics:
        report["epsilon"] = trainer.callback_metrics["privacy/epsilon"].item()
    for record in probe.steps:
        if "update" not in record:
            continue
        noise = -record["update"] - record["clean"]
        step = {
            "noise_var": {n: noise[a:b].var().item() for n, (a, b) in seg.items()},
            "noise_absmax": {n: noise[a:b].abs().max().item() for n, (a, b) in seg.items()},
            "update_norm": record["update"].norm().item(),
            "clean_norm": record["clean"].norm().item(),
        }
        if "expected" in record:
            step["max_err_expected"] = (-record["update"] - record["expected"]).abs().max().item()
            step["expected_norm"] = record["expected"].norm().item()
        report["steps"].append(step)
    if isinstance(defense, GradientDefense):
        report["placement"] = defense.placement
        if isinstance(defense, CountingDefense):
            report["hook_calls"] = defense.hook_calls
    return name, report


def epsilon_after(epochs):
    from lightning_privacy.accountants import BatchClippingAccountant

    acct = BatchClippingAccountant(max_grad_norm=1.0, std=4.0)
    acct.step(epochs=epochs)
    return acct.get_epsilon(1e-3)


def clip_fn(c):
    return lambda grads: apply_transforms([GradientClipping(max_norm=c)], grads)


def topk_fn(ratio):
    return lambda grads: apply_transforms([MagnitudePruning(ratio=ratio, scope="global")], grads)


def scenario(name):
    if name == "local":
        return run(name, CountingDefense(GaussianNoise(std=STD), seed=3), steps=3)
    if name == "aggregate":
        return run(name, GradientDefense(GaussianNoise(std=STD), placement="aggregate"), steps=2)
    if name == "layers":
        return run(name, GradientDefense(GaussianNoise(std=STD), layers=r"^net\.2\."), steps=1)
    if name == "accumulate":
        defense = CountingDefense(GaussianNoise(std=STD), seed=3)
        return run(name, defense, steps=2, accumulate_grad_batches=2)
    if name == "global_clip":
        # one bucket per parameter after DDP rebuilds its buckets (after the first step)
        defense = CountingDefense(GradientClipping(max_norm=0.05), seed=3)
        return run(name, defense, steps=3, expected_fn=clip_fn(0.05), bucket_cap_mb=1e-5)
    if name == "global_topk":
        defense = CountingDefense(MagnitudePruning(ratio=0.9, scope="global"), seed=3)
        return run(name, defense, steps=3, expected_fn=topk_fn(0.9), bucket_cap_mb=1e-5)
    if name == "fp16_noise":
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
        return run(name, GradientDefense(GaussianNoise(std=STD)), steps=1, plugins=[plugin])
    if name == "fp16_clip":
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
        defense = GradientDefense(GradientClipping(max_norm=0.05))
        return run(name, defense, steps=1, plugins=[plugin])
    if name == "manual":
        defense = CountingDefense(GaussianNoise(std=STD), seed=3)
        return run(name, defense, steps=2, manual=True)
    if name == "budget":
        # ε after 2 epochs < budget < ε after 3 epochs: both ranks must stop after epoch 2
        pipeline = [GradientClipping(max_norm=1.0), GaussianNoise(std=4.0)]
        budget = (epsilon_after(2) + epsilon_after(3)) / 2
        defense = GradientDefense(pipeline, max_epsilon=budget, target_delta=1e-3)
        return run(name, defense, steps=-1, max_epochs=10, limit_train_batches=1)
    if name == "bf16":
        defense = GradientDefense(GaussianNoise(std=STD))
        return run(name, defense, steps=1, precision="bf16-mixed")
    raise ValueError(name)


def main():
    out, names = sys.argv[1], sys.argv[2:]
    results = dict(scenario(n) for n in names)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
    end_ddp()
