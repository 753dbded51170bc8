"""Membership inference on embedded data: attacks ranked, DP-SGD audited, CNN vs transformer.

Three tables, each from ``lightning_privacy.sweep.membership.run_membership_audit`` (what
``lightning-privacy audit membership --config ...`` runs: every model a task of the sweep's local
runner, its outputs cached under ``--out``, so a rerun or another target reuses them):

1. **An overfitted model** -- an MLP (2 x 512, ReLU) on the scikit-image photo patches (16 px,
   grey, 6 classes, 1,800 patches; 200 of them a population nobody trains on, the other 1,600
   the pool), trained on a random half of the pool to train accuracy 1.0. Every attack scores
   the 1,600 pool examples (members: the target's half); LiRA (offline) and RMIA use 16
   reference models, each trained on its own random half, the ones left out of an example only.
2. **The same model under DP-SGD** (``target_epsilon`` 8, 3, 1; δ = 1 / (10 N); C = 1): AUC of
   the attacks, the ε each proves (Clopper-Pearson, 95 %), and the one-run canary audit
   (200 noise-image canaries, each in the training set with probability ½; Steinke et al.) --
   beside the accountant's ε. Every target (the non-private one too) trains with the canaries.
3. **CNN vs transformer at matched accuracy and gap** -- timm ResNet-18 (CIFAR stem) and
   ViT-Tiny (patch 4, 6 blocks), ``pretrained=False``, on the same pool and halves; threshold
   attacks (no reference models), AUC with its DeLong interval, TPR at 1 % FPR with a bootstrap
   interval.

Usage: ``python examples/membership_audit.py [--quick] [--tables 1,2,3] [--out DIR]
[--workers 2] [--device cpu|cuda]``. ``--device cuda`` trains every model on the GPU and prints
the same tables (its numbers differ by the GPU's arithmetic; a GPU is never needed). ``--quick``
shrinks everything (digits, 2 epochs, 2 reference models) to check that it runs; its numbers
mean nothing. ``--in-process`` trains the models one by one in this process instead of the
runner's spawned workers.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import yaml

from lightning_privacy.sweep.membership import parse_membership_config, run_membership_audit

BASE = {
    "name": "photos-mlp",
    "data": {
        "dataset": "photos",
        "image_size": 16,
        "channels": 1,
        "patches_per_photo": 300,
        "population": 200,
        "standardize": True,
        "seed": 0,
    },
    "model": {"name": "mlp", "width": 512, "depth": 2},
    "training": {
        "epochs": 80,
        "batch_size": 32,
        "optimizer": "adam",
        "lr": 0.001,
        "schedule": "cosine",
        "seed": 0,
    },
    "target": {"defense": "none", "canaries": {"num_canaries": 200, "kind": "input", "seed": 0}},
    "reference_models": 16,
    "attacks": ["loss", "confidence", "entropy", "modified_entropy", "lira_offline", "rmia"],
}
QUICK = {
    "data": {"dataset": "digits", "image_size": 8, "population": 97},
    "model": {"name": "mlp", "width": 32, "depth": 1},
    "training": {"epochs": 2, "batch_size": 64},
    "reference_models": 2,
}
#: DP-SGD targets: their own batch and step (the references train as in table 1).
DP = {"defense": "dpsgd", "max_grad_norm": 1.0, "batch_size": 64, "lr": 0.002}
EPSILONS = (8.0, 3.0, 1.0)
#: Architectures of table 3 and the training that brings each to train accuracy 1.0.
ARCHITECTURES = {
    "resnet18": {"epochs": 30, "lr": 0.001},
    "vit_tiny": {"epochs": 60, "lr": 0.0005},
}
THRESHOLD = ["loss", "confidence", "entropy", "modified_entropy"]


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def audit(settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    config = parse_membership_config(yaml.safe_dump(settings))
    return run_membership_audit(
        config, args.out, workers=args.workers, in_process=args.in_process, progress=not args.quiet
    )


def pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def interval(low: float, high: float, scale: float = 1.0, digits: int = 3) -> str:
    return f"[{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def target_line(result: dict[str, Any]) -> str:
    t = result["target"]
    gap = t["train_acc"] - t["test_acc"]
    return (
        f"target: train acc {t['train_acc']:.3f}, test acc {t['test_acc']:.3f}, gap {gap:.3f}; "
        f"{result['members']} members / {result['nonmembers']} non-members; "
        f"{result['reference_models']} reference models (mean test acc "
        f"{fmt(result['reference_test_acc'], 3)}); {t['seconds']:.0f} s to train"
    )


def table_overfit(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    result = audit(base, args)
    print("\n### 1. An overfitted model\n")
    print(target_line(result) + "\n")
    print(
        "| attack | reference models | AUC [95 % CI] | TPR at 1 % FPR (%) [95 % CI] | "
        "TPR at 0.1 % FPR (%) | advantage | ε lower bound |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in result["attacks"].items():
        refs = result["reference_models"] if name in ("lira_offline", "rmia") else 0
        print(
            f"| {name} | {refs} | {row['auc']:.3f} {interval(row['auc_low'], row['auc_high'])} | "
            f"{pct(row['tpr_at_fpr_0.01'])} "
            f"{interval(row['tpr_at_fpr_0.01_low'], row['tpr_at_fpr_0.01_high'], 100, 1)} | "
            f"{pct(row['tpr_at_fpr_0.001'])} | {row['advantage']:.3f} | "
            f"{row['epsilon_lower_bound']:.2f} |"
        )
    ranking(result)
    return result


def ranking(result: dict[str, Any]) -> None:
    attacks = result["attacks"]
    thresholds = {n: attacks[n]["tpr_at_fpr_0.01"] for n in attacks if n in THRESHOLD}
    references = {n: attacks[n]["tpr_at_fpr_0.01"] for n in attacks if n not in THRESHOLD}
    if not thresholds or not references:
        return
    best_t = max(thresholds, key=thresholds.get)
    best_r = max(references, key=references.get)
    holds = references[best_r] >= thresholds[best_t]
    print(
        f"\nAt 1 % FPR the best reference-model attack ({best_r}, {pct(references[best_r])} %) "
        f"{'beats or ties' if holds else 'does NOT beat'} the best threshold attack "
        f"({best_t}, {pct(thresholds[best_t])} %): the literature's ranking "
        f"{'holds' if holds else 'does not hold'} here."
    )


def table_dp(args: argparse.Namespace, base: dict[str, Any], plain: dict[str, Any]) -> None:
    rows = [("no DP", plain)]
    for eps in EPSILONS:
        settings = merged(base, {"target": {**DP, "target_epsilon": eps}})
        settings["name"] = f"photos-mlp-dp{eps:g}"
        rows.append((f"DP-SGD ε = {eps:g}", audit(settings, args)))
    print("\n### 2. The same model under DP-SGD\n")
    print(
        "| target | accountant ε | train acc | test acc | AUC loss | AUC LiRA | AUC RMIA | "
        "MIA ε lower bound (best attack) | canary ε lower bound (guesses right/made) | "
        "both below the accountant |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, result in rows:
        t, attacks = result["target"], result["attacks"]
        eps = t.get("epsilon")
        mia = max(r["epsilon_lower_bound"] for r in attacks.values())
        best = max(attacks, key=lambda n: attacks[n]["epsilon_lower_bound"])
        canary = t.get("canary_audit") or {}
        bound = canary.get("epsilon_lower_bound")
        below = "—" if eps is None else ("yes" if mia <= eps and (bound or 0) <= eps else "NO")
        auc = {n: fmt(attacks.get(n, {}).get("auc"), 3) for n in ("loss", "lira_offline", "rmia")}
        print(
            f"| {label} | {fmt(eps) if eps is not None else '∞'} | {t['train_acc']:.3f} | "
            f"{t['test_acc']:.3f} | {auc['loss']} | {auc['lira_offline']} | {auc['rmia']} | "
            f"{mia:.2f} ({best}) | {fmt(bound)} ({canary.get('correct', 0)}/"
            f"{canary.get('guesses', 0)}) | {below} |"
        )


def table_architectures(args: argparse.Namespace, base: dict[str, Any]) -> None:
    rows = []
    for name, training in ARCHITECTURES.items():
        changes = {
            "name": f"photos-{name}",
            "model": {"name": name},
            "training": training,
            "target": {"defense": "none", "canaries": None},
            "reference_models": 0,
            "attacks": THRESHOLD,
        }
        if args.quick:
            changes["training"] = {"epochs": 1}
        rows.append((name, audit(merged(base, changes), args)))
    print("\n### 3. CNN vs transformer at matched accuracy and gap\n")
    print(
        "| model | epochs | train acc | test acc | gap | attack | AUC [95 % CI] | "
        "TPR at 1 % FPR (%) [95 % CI] | ε lower bound | s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for name, result in rows:
        t, attacks = result["target"], result["attacks"]
        best = max(attacks, key=lambda n: attacks[n]["auc"])
        for attack in ("loss", best) if best != "loss" else ("loss",):
            row = attacks[attack]
            print(
                f"| {name} | {result['settings']['training']['epochs']} | {t['train_acc']:.3f} | "
                f"{t['test_acc']:.3f} | {t['train_acc'] - t['test_acc']:.3f} | {attack} | "
                f"{row['auc']:.3f} {interval(row['auc_low'], row['auc_high'])} | "
                f"{pct(row['tpr_at_fpr_0.01'])} "
                f"{interval(row['tpr_at_fpr_0.01_low'], row['tpr_at_fpr_0.01_high'], 100, 1)} | "
                f"{row['epsilon_lower_bound']:.2f} | {t['seconds']:.0f} |"
            )
    verdict(rows)


def verdict(rows: list[tuple[str, dict[str, Any]]]) -> None:
    (cnn, a), (vit, b) = rows
    la, lb = a["attacks"]["loss"], b["attacks"]["loss"]
    overlap = la["auc_low"] <= lb["auc_high"] and lb["auc_low"] <= la["auc_high"]
    more = vit if lb["auc"] > la["auc"] else cnn
    print(
        f"\nLoss-attack AUC: {cnn} {la['auc']:.3f}, {vit} {lb['auc']:.3f}; the 95 % intervals "
        f"{'overlap: no significant difference' if overlap else 'do not overlap'} "
        f"({more} leaks more by this measure)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run: checks that it works")
    parser.add_argument("--tables", default="1,2,3", help="which tables, e.g. 1,2")
    parser.add_argument("--out", type=Path, default=Path("runs/membership_audit"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--in-process", action="store_true", help="train in this process")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="train on it")
    args = parser.parse_args()
    base = merged(BASE, QUICK) if args.quick else BASE
    base = merged(base, {"training": {"accelerator": args.device}})
    tables = {int(t) for t in args.tables.split(",")}
    start = time.perf_counter()
    plain = table_overfit(args, base) if tables & {1, 2} else None
    if 2 in tables and plain is not None:
        table_dp(args, base, plain)
    if 3 in tables:
        table_architectures(args, base)
    print(f"\n{time.perf_counter() - start:.0f} s in all (cached models are not retrained)")


if __name__ == "__main__":
    main()
