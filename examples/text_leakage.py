"""Which words of a text batch leak from a language model's gradient, and what stops it?

A small causal transformer (``TinyTransformerLM``, tied and untied embeddings) reads batches
of Python's own documentation strings (the standard library's module docstrings, word-level
vocabulary; nothing downloaded). ``TokenLeakage`` recovers the set of words in the batch from
the rows of the token-embedding gradient; we score it against the true set (precision, recall)
without a defense and under each defense, at initialisation and after a short training.

    python examples/text_leakage.py           # ~1-2 min on one CPU core
    python examples/text_leakage.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections import Counter

import torch
from rich.console import Console
from rich.table import Table

from lightning_privacy.attacks import create_attack
from lightning_privacy.defenses import (
    GaussianNoise,
    GradientClipping,
    GradientTransform,
    LowRankFiltering,
    MagnitudePruning,
    apply_transforms,
)
from lightning_privacy.functional.gradients import parameter_gradients
from lightning_privacy.models import TinyTransformerLM

_MODULE_NAMES = (
    "abc argparse ast asyncio base64 bisect calendar collections contextlib copy csv dataclasses "
    "datetime decimal difflib enum fnmatch fractions functools getopt gettext glob gzip hashlib "
    "heapq hmac html inspect io ipaddress itertools json logging mailbox math mimetypes "
    "numbers operator optparse os pathlib pickle pkgutil platform pprint queue random re sched "
    "secrets selectors shelve shlex shutil signal smtplib socket sqlite3 statistics string "
    "struct subprocess tarfile tempfile textwrap threading timeit tokenize trace traceback "
    "turtle typing unittest urllib uuid warnings wave weakref zipfile zoneinfo"
)
MODULES = tuple(_MODULE_NAMES.split())


def docstring_corpus() -> list[str]:
    """Lower-cased words of the standard library's module docstrings (offline)."""
    words: list[str] = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # a module missing on this platform is skipped
            continue
        words += re.findall(r"[a-z]+", (module.__doc__ or "").lower())
    return words


def defenses() -> dict[str, list[GradientTransform]]:
    return {
        "none": [],
        "noise std 1e-4": [GaussianNoise(std=1e-4)],
        "noise std 1e-3": [GaussianNoise(std=1e-3)],
        "noise std 1e-2": [GaussianNoise(std=1e-2)],
        "clip 1 + noise 1e-2": [GradientClipping(max_norm=1.0), GaussianNoise(std=1e-2)],
        "top-k pruning 0.9": [MagnitudePruning(ratio=0.9)],
        "top-k pruning 0.99": [MagnitudePruning(ratio=0.99)],
        "low-rank 1": [LowRankFiltering(rank=1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=None, help="audited batches per setting")
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    batches = args.batches or (1 if args.quick else 5)
    train_steps = args.train_steps if args.train_steps is not None else (5 if args.quick else 200)

    words = docstring_corpus()
    vocab = ["<unk>"] + [w for w, _ in Counter(words).most_common(args.vocab - 1)]
    index = {w: i for i, w in enumerate(vocab)}
    ids = torch.tensor([index.get(w, 0) for w in words])
    n_seq = len(ids) // args.seq_len
    sequences = ids[: n_seq * args.seq_len].view(n_seq, args.seq_len)
    order = torch.randperm(n_seq, generator=torch.Generator().manual_seed(args.seed))
    held_out = sequences[order[: batches * args.batch]].view(batches, args.batch, args.seq_len)
    train = sequences[order[batches * args.batch :]]

    attack = create_attack("token_leakage")
    console = Console(width=None if sys.stdout.isatty() else 110)
    console.print(
        f"Corpus: {len(words):,} words of {len(MODULES)} stdlib docstrings, vocabulary "
        f"{len(vocab)}, {n_seq} sequences of {args.seq_len}; batches of {args.batch}."
    )
    table = Table(
        title=f"TokenLeakage on TinyTransformerLM, word set of a batch ({batches} batch(es))"
    )
    for column in ("embeddings", "weights", "defense", "precision", "recall", "F1"):
        table.add_column(column, justify="left" if column in ("defense",) else "right")
    example_shown = False
    for tied in (True, False):
        torch.manual_seed(args.seed)
        model = TinyTransformerLM(
            vocab_size=len(vocab),
            d_model=64,
            n_layers=2,
            n_heads=4,
            max_len=args.seq_len,
            tie_embeddings=tied,
        )
        for stage in ("init", f"trained {train_steps} steps"):
            if stage != "init":
                optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
                gen = torch.Generator().manual_seed(args.seed)
                for _ in range(train_steps):
                    rows = torch.randint(len(train), (16,), generator=gen)
                    loss = model.loss_fn(model(train[rows]), train[rows])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            for name, transforms in defenses().items():
                tp = fp = fn = 0
                for b, tokens in enumerate(held_out):
                    grads = parameter_gradients(model, tokens, tokens, loss_fn=model.loss_fn)
                    defended = apply_transforms(
                        transforms,
                        list(grads.values()),
                        generator=torch.Generator().manual_seed(args.seed + b),
                    )
                    rec = attack.reconstruct(
                        model,
                        defended,
                        input_shape=(args.seq_len,),
                        num_samples=args.batch,
                    )
                    found = set(rec.inputs.flatten().tolist())
                    truth = set(tokens.flatten().tolist())
                    tp += len(found & truth)
                    fp += len(found - truth)
                    fn += len(truth - found)
                    if not example_shown and name == "none":
                        example_shown = True
                        shown = sorted(vocab[i] for i in found & truth)[:25]
                        console.print(
                            f"Recovered {len(found & truth)}/{len(truth)} distinct words of one "
                            f"batch (no defense), e.g.: {' '.join(shown)}"
                        )
                precision = tp / max(tp + fp, 1)
                recall = tp / max(tp + fn, 1)
                f1 = 2 * precision * recall / max(precision + recall, 1e-12)
                table.add_row(
                    "tied" if tied else "untied",
                    stage,
                    name,
                    f"{precision:.2f}",
                    f"{recall:.2f}",
                    f"{f1:.2f}",
                )
            table.add_section()
    console.print(table)


if __name__ == "__main__":
    main()
