"""``InversionAudit``: attack a held-out batch on a schedule and log how much of it leaks.

What it simulates: an honest-but-curious server (or eavesdropper) that sees the gradient a client
sends, *after* the Trainer's :class:`~lightning_privacy.callbacks.GradientDefense` (the same
transforms and ``layers=``, drawn from the audit's own generator; under DDP with
``placement="local"`` the per-rank gradient that leaves one rank). The gradient is computed at
the current weights on a fixed held-out batch with ``torch.func.functional_call`` on detached
parameters, in eval mode (BatchNorm uses its running statistics, which the attacker therefore
knows; dropout off), and the labels are *not* given to the attacker (restored or optimised).

Hooks: ``on_train_batch_end`` (``every_n_train_steps``) and ``on_train_epoch_end``
(``every_n_epochs``; the default is once per epoch). Attacks need autograd, so they never run in
validation hooks.

Ranks: only global rank 0 attacks. The attack runs synchronously inside the hook and is
**bounded by** ``max_seconds``: the other ranks wait for at most that long (in a broadcast of
rank 0's results at the end of the hook, where they would otherwise wait at the next gradient
all-reduce). Under a distributed strategy with ``max_seconds=None`` the bound is half the process
group's timeout, so a DDP run never hits a collective timeout.

Never changes the training trajectory: no ``.backward()`` on the model, no ``.grad`` written, BN
buffers cloned, the global RNG forked (the attack draws from its own generator), train/eval mode
restored. A run with and without the audit ends with bitwise-identical weights.

Logged (rank 0, through every logger, and copied into ``trainer.callback_metrics`` of every rank
so ``EarlyStopping(monitor="attack/psnr")`` can watch them, also under DDP): ``attack/psnr``,
``attack/ssim``, ``attack/mse``, ``attack/label_acc``, ``attack/seconds``; the threat model as
``attack/defended``, ``attack/labels_known``, ``attack/bn_stats_known`` (0/1) plus, in
``history`` and as TensorBoard text, the placement and BN mode; text models log
``attack/token_precision`` and ``attack/token_recall``. Images: a grid of truth (top row) vs
reconstruction (bottom row) via TensorBoard ``add_image`` / W&B ``log_image`` when the logger has
them, otherwise PNG files under ``<log_dir>/inversion_audit/``. With validation data, put the
audit before ``EarlyStopping(..., check_on_train_epoch_end=True)``.

An attack that raises or returns NaN logs a warning; training continues.

Example:
    >>> import lightning as L, torch
    >>> from lightning_privacy.attacks import InvertingGradients
    >>> from lightning_privacy.data import DigitsDataModule
    >>> from lightning_privacy.models import LeNetDLG, LitClassifier
    >>> audit = InversionAudit(InvertingGradients(max_iterations=5), log_images=False)
    >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1,
    ...                     callbacks=[audit], logger=False, enable_progress_bar=False,
    ...                     enable_checkpointing=False, enable_model_summary=False)
    >>> module = LitClassifier(LeNetDLG(num_classes=10, channels=1, image_size=8))
    >>> trainer.fit(module, DigitsDataModule(image_size=8, batch_size=8))
    >>> sorted(k for k in trainer.callback_metrics if k.startswith("attack/"))[:3]
    ['attack/bn_stats_known', 'attack/defended', 'attack/label_acc']
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_privacy._validation import check_choice, check_float, check_int
from lightning_privacy.attacks import Attack, create_attack
from lightning_privacy.callbacks import _trainer_internals as internals
from lightning_privacy.callbacks._gradient_view import (
    find_gradient_defense,
    fix_held_out_batch,
    module_loss_fn,
    observed_gradients,
    split_batch,
)
from lightning_privacy.callbacks._observer import ScheduledObserver, isolated, log_rank_zero
from lightning_privacy.functional.attacks.common import Reconstruction, bn_mode
from lightning_privacy.metrics import reconstruction_metrics


class InversionAudit(ScheduledObserver):
    """Run a gradient-inversion attack on a held-out batch on a schedule and log its success.

    Args:
        attack: A registered attack name (``lightning_privacy.attacks.list_attacks()``) or a
            configured :class:`~lightning_privacy.attacks.Attack` instance.
        every_n_epochs: Attack at the end of every n-th training epoch.
        every_n_train_steps: Attack after every n-th optimizer step (not both; neither means
            once per epoch).
        batch: ``(inputs, targets)`` to attack; default: taken once from the validation data.
        num_samples: How many examples of the held-out batch the attacked gradient covers.
        max_seconds: Wall-time bound of one attack (keeps the best iterate so far).
        apply_defenses: Attack the gradient after the Trainer's ``GradientDefense``.
        log_images: Log truth-vs-reconstruction grids.
        seed: Seed of the audit's generator (defense draws, attack starts).

    Attributes:
        history: One dict per measurement: step, epoch, metrics and the threat model.
        last: The last :class:`~lightning_privacy.functional.attacks.Reconstruction`.

    Example:
        >>> audit = InversionAudit("deep_leakage", every_n_train_steps=50, max_seconds=30)
        >>> type(audit.attack).__name__, audit.schedule.every_n_train_steps
        ('DeepLeakage', 50)
    """

    def __init__(
        self,
        attack: str | Attack = "inverting_gradients",
        *,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        batch: Any = None,
        num_samples: int = 1,
        max_seconds: float | None = None,
        apply_defenses: bool = True,
        log_images: bool = True,
        seed: int = 0,
    ) -> None:
        self.attack: Attack = create_attack(attack) if isinstance(attack, str) else attack
        if not isinstance(self.attack, Attack):
            raise TypeError(
                "Expected `attack` to be an attack name or an Attack instance, "
                f"but got {type(attack).__name__}."
            )
        super().__init__(
            every_n_epochs=every_n_epochs, every_n_train_steps=every_n_train_steps, seed=seed
        )
        self.num_samples = check_int("num_samples", num_samples, low=1)
        self.max_seconds = (
            None
            if max_seconds is None
            else check_float("max_seconds", max_seconds, low=0.0, low_open=True)
        )
        self.apply_defenses = check_choice("apply_defenses", apply_defenses, (True, False))
        self.log_images = check_choice("log_images", log_images, (True, False))
        if batch is not None:
            split_batch(batch, self.num_samples)
        self.batch = batch
        self.last: Reconstruction | None = None
        self._held_out: tuple[Tensor, Tensor] | None = None
        self._bound: float | None = self.max_seconds

    def _defining_arguments(self) -> dict[str, Any]:
        return {
            **super()._defining_arguments(),
            "attack": repr(self.attack),
            "num_samples": self.num_samples,
            "apply_defenses": self.apply_defenses,
        }

    def _subject(self) -> str:
        return f"the {type(self.attack).__name__} attack"

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check everything that can fail before training and fix the held-out batch."""
        if stage != "fit":
            return
        problems: list[str] = []
        batch = fix_held_out_batch(trainer, pl_module, self.batch, seed=self.seed)
        if batch is None:
            problems.append(
                "no held-out batch: pass `batch=(inputs, targets)` or give the Trainer "
                "validation data"
            )
        else:
            try:
                inputs, targets = split_batch(batch, self.num_samples)
            except (TypeError, ValueError) as err:
                problems.append(str(err).rstrip("."))
            else:
                problems += self._modality_problems(inputs)
                self._held_out = (inputs.detach().clone(), targets.detach().clone())
        if problems:
            raise ValueError("InversionAudit cannot run: " + "; ".join(problems) + ".")
        if trainer.world_size > 1 and self.max_seconds is None:
            self._bound = 0.5 * internals.process_group_timeout(trainer).total_seconds()
        self._bind_generator(pl_module.device)

    def _modality_problems(self, inputs: Tensor) -> list[str]:
        text = not inputs.is_floating_point()
        if text and self.attack.modality != "text":
            return [
                f"{type(self.attack).__name__} reconstructs images, but the held-out inputs are "
                f"token ids ({inputs.dtype}); use attack='token_leakage' for text models"
            ]
        if not text and self.attack.modality == "text":
            return [
                f"{type(self.attack).__name__} attacks text models, but the held-out inputs are "
                f"{inputs.dtype} tensors; use an image attack such as 'inverting_gradients'"
            ]
        return []

    # ------------------------------------------------------------------ hooks
    def _attack(self) -> Attack:
        if self._bound is None:
            return self.attack
        fields = {f.name for f in dataclasses.fields(self.attack)}  # type: ignore[arg-type]
        if "max_seconds" not in fields:
            return self.attack
        return dataclasses.replace(self.attack, max_seconds=self._bound)  # type: ignore[type-var]

    def _observe(self, trainer: L.Trainer, pl_module: L.LightningModule, *, on_step: bool) -> None:
        metrics = None
        if trainer.is_global_zero and self._held_out is not None:
            metrics = self._audit(trainer, pl_module)
        if trainer.world_size > 1:
            # every rank reaches this point (the schedule is the same everywhere) and waits here
            # instead of at the next all-reduce; then EarlyStopping sees the metrics on each rank
            metrics = trainer.strategy.broadcast(metrics, src=0)
        for key, value in (metrics or {}).items():
            trainer.callback_metrics[key] = torch.tensor(value)

    def _audit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        """Rank 0: attack the held-out batch, log everything; the scalars (``None``: failed)."""
        assert self._held_out is not None
        defense = find_gradient_defense(trainer) if self.apply_defenses else None
        inputs, targets = (t.to(pl_module.device) for t in self._held_out)
        start = time.perf_counter()
        try:
            rec, mode = self._reconstruct(pl_module, inputs, targets, defense)
            scores = reconstruction_metrics(rec, (inputs.cpu(), targets.cpu()))
        except Exception as err:  # caught here, not by the base: the other ranks wait for rank 0
            self._failed(trainer, f"raised {type(err).__name__}: {err}")
            return None
        if not _finite(rec, scores):
            self._failed(trainer, "returned NaN")
            return None
        threat = {
            "attack": type(self.attack).__name__,
            "defended": defense is not None,
            "placement": getattr(defense, "placement", "none") if defense is not None else "none",
            "bn_mode": mode,
            "bn_stats_known": mode == "eval",
            "labels_known": False,
        }
        metrics = {f"attack/{k}": float(v) for k, v in scores.items() if not math.isnan(v)}
        metrics["attack/seconds"] = time.perf_counter() - start
        metrics["attack/defended"] = float(threat["defended"])
        metrics["attack/labels_known"] = 0.0
        metrics["attack/bn_stats_known"] = float(threat["bn_stats_known"])
        self._record(trainer, metrics, threat, rec, inputs)
        return metrics

    def _reconstruct(
        self, pl_module: L.LightningModule, inputs: Tensor, targets: Tensor, defense: Any
    ) -> tuple[Reconstruction, str]:
        """The attack on the defended gradient of ``(inputs, targets)``; and the BN mode."""
        loss_fn = module_loss_fn(pl_module)
        with isolated(pl_module, train=False, seed=self.seed), torch.enable_grad():
            observed = observed_gradients(
                pl_module,
                inputs,
                targets,
                loss_fn=loss_fn,
                defense=defense,
                generator=self.generator,
            )
            rec = self._attack().reconstruct(
                pl_module,
                observed.defended,
                input_shape=tuple(inputs.shape[1:]),
                num_samples=len(inputs),
                loss_fn=loss_fn,
                generator=self.generator,
            )
            return rec, bn_mode(pl_module)

    def _record(
        self,
        trainer: L.Trainer,
        metrics: dict[str, float],
        threat: dict[str, Any],
        rec: Reconstruction,
        inputs: Tensor,
    ) -> None:
        """Log the scalars, the threat model and the images; keep the result in ``history``."""
        step = trainer.global_step
        log_rank_zero(trainer, metrics, step)
        self.last = rec
        self.history.append(
            {"step": step, "epoch": trainer.current_epoch, **metrics, "threat_model": threat}
        )
        self._log_threat_text(trainer, threat, step)
        if self.log_images and rec.inputs.is_floating_point() and rec.inputs.dim() == 4:
            self._log_images(trainer, inputs.cpu(), rec.inputs.detach().cpu(), step)

    @staticmethod
    def _log_threat_text(trainer: L.Trainer, threat: dict[str, Any], step: int) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_text"):
                experiment.add_text("attack/threat_model", json.dumps(threat), step)

    def _log_images(self, trainer: L.Trainer, truth: Tensor, rec: Tensor, step: int) -> None:
        from torchvision.utils import make_grid, save_image

        from lightning_privacy.functional.metrics import match_order

        rec = rec.clamp(0, 1)
        if len(rec) > 1:
            rec = rec[match_order(rec, truth)]
        grid = make_grid(torch.cat([truth, rec]), nrow=len(truth), padding=1, pad_value=1.0)
        sent = False
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_image"):
                experiment.add_image("attack/reconstruction", grid, step)
                sent = True
            elif hasattr(logger, "log_image"):
                logger.log_image(key="attack/reconstruction", images=[grid], step=step)
                sent = True
        if not sent:
            # Not ``trainer.log_dir``: it broadcasts, a collective that only rank 0 would enter.
            log_dir = next(
                (lg.log_dir for lg in trainer.loggers if getattr(lg, "log_dir", None)), None
            )
            folder = Path(log_dir or trainer.default_root_dir) / "inversion_audit"
            folder.mkdir(parents=True, exist_ok=True)
            save_image(grid, folder / f"step_{step:07d}.png")


def _finite(rec: Reconstruction, scores: dict[str, float]) -> bool:
    """Whether the reconstruction and its scores are numbers (label accuracy, SSIM may be NaN)."""
    finite = bool(torch.isfinite(rec.inputs.float()).all()) if rec.inputs.numel() else True
    return finite and not any(
        math.isnan(v) for k, v in scores.items() if k not in ("label_acc", "ssim")
    )
