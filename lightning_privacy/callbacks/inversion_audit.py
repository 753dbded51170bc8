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

The user's module: a :class:`~lightning_privacy.ModelAdapter` (``adapter=``, or the module's
``privacy_adapter`` attribute) says how the held-out batch splits into inputs and targets, how the
module is called and which loss ``training_step`` uses (default: ``(x, y)`` or dict batches,
``module(x)``, the module's ``loss_fn`` or cross-entropy). Before the first training step the
audit replays that loss once on the batch and raises every problem at once (channels, image size,
labels out of range, a forward that needs more arguments, an operation without double backward),
and warns if the replayed loss differs from what ``training_step`` returns. Attention runs on the
math backend, so fused attention (timm, torchvision, Hugging Face) needs no change.

Ranks: only global rank 0 attacks. The attack runs synchronously inside the hook and is
**bounded by** ``max_seconds`` (120 s by default): the other ranks wait for at most that long (in
a broadcast of rank 0's results at the end of the hook, where they would otherwise wait at the
next gradient all-reduce). Under a distributed strategy the bound is at most half the process
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
reconstruction (bottom row) to every logger in its own way (TensorBoard ``add_image``, W&B
``log_image``, MLflow ``log_image``, CSV: ``0600`` PNGs under ``<log_dir>/inversion_audit/``) and
to ``image_dir``; never into the working directory (``callbacks/_images.py``). With validation
data, put the audit before ``EarlyStopping(..., check_on_train_epoch_end=True)``.

An attack that raises or returns NaN warns (once per cause), logs ``attack/failed = 1`` and NaN
under the other ``attack/*`` keys (no stale value stays in ``callback_metrics``); training
continues (``on_error="raise"`` re-raises instead). A measurement that succeeds logs
``attack/failed = 0``.

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
    >>> metrics = trainer.callback_metrics
    >>> "attack/psnr" in metrics, "attack/label_acc" in metrics, metrics["attack/failed"].item()
    (True, True, 0.0)
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

from lightning_privacy._validation import check_bool
from lightning_privacy.adapters import ModelAdapter
from lightning_privacy.attacks import Attack, create_attack
from lightning_privacy.callbacks import _trainer_internals as internals
from lightning_privacy.callbacks._gradient_view import (
    GradientObserver,
    find_gradient_defense,
    observed_gradients,
)
from lightning_privacy.callbacks._images import (
    check_image_dir,
    reconstruction_grid,
    send_image,
    send_text,
)
from lightning_privacy.callbacks._observer import isolated, log_rank_zero
from lightning_privacy.callbacks._progress import measurement_progress
from lightning_privacy.functional.attacks.common import Reconstruction, bn_mode
from lightning_privacy.metrics import reconstruction_metrics


class InversionAudit(GradientObserver):
    """Run a gradient-inversion attack on a held-out batch on a schedule and log its success.

    Args:
        attack: A registered attack name (``lightning_privacy.attacks.list_attacks()``) or a
            configured :class:`~lightning_privacy.attacks.Attack` instance.
        every_n_epochs: Attack at the end of every n-th training epoch.
        every_n_train_steps: Attack after every n-th optimizer step (not both; neither means
            once per epoch).
        batch: The batch to attack, in any format the adapter unpacks (``(inputs, targets)``, a
            dict, ...); default: taken once from the validation data.
        num_samples: How many examples of the held-out batch the attacked gradient covers.
        adapter: How to replay the training loss on the user's module
            (:class:`~lightning_privacy.ModelAdapter`); default: the module's
            ``privacy_adapter`` attribute, else ``ModelAdapter()``.
        max_seconds: Wall-time bound of one attack (keeps the best iterate so far); ``None``:
            unbounded in one process, half the process group's timeout under DDP.
        apply_defenses: Attack the gradient after the Trainer's ``GradientDefense``.
        log_images: Log truth-vs-reconstruction grids.
        image_dir: Also write the grids as PNG files here (``0600``, folders made ``0700``).
        on_error: ``"warn"`` (a failed attack warns and training goes on) or ``"raise"``.
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
        adapter: ModelAdapter | None = None,
        max_seconds: float | None = 120.0,
        apply_defenses: bool = True,
        log_images: bool = True,
        image_dir: str | Path | None = None,
        on_error: str = "warn",
        seed: int = 0,
    ) -> None:
        self.attack: Attack = create_attack(attack) if isinstance(attack, str) else attack
        if not isinstance(self.attack, Attack):
            raise TypeError(
                "Expected `attack` to be an attack name or an Attack instance, "
                f"but got {type(attack).__name__}."
            )
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            batch=batch,
            num_samples=num_samples,
            adapter=adapter,
            max_seconds=max_seconds,
            seed=seed,
            on_error=on_error,
        )
        self.apply_defenses = check_bool("apply_defenses", apply_defenses)
        self.log_images = check_bool("log_images", log_images)
        self.image_dir = check_image_dir(image_dir)
        self.last: Reconstruction | None = None
        self._bound: float | None = self.max_seconds

    def _defining_arguments(self) -> dict[str, Any]:
        return {
            **super()._defining_arguments(),
            "attack": repr(self.attack),
            "num_samples": self.num_samples,
            "apply_defenses": self.apply_defenses,
        }

    metric_prefix = "attack"

    def _subject(self) -> str:
        return f"the {type(self.attack).__name__} attack"

    # ------------------------------------------------------------------ setup
    def _needs_continuous(self) -> bool:
        return self.attack.modality != "text"  # token attacks read the embedding gradient

    def _setup_problems(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        if trainer.world_size > 1:  # never past the collective the other ranks wait in
            half = 0.5 * internals.process_group_timeout(trainer).total_seconds()
            self._bound = half if self.max_seconds is None else min(self.max_seconds, half)
        return [] if self._held_out is None else self._modality_problems(self._held_out[0])

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
        if trainer.is_global_zero:
            metrics = self._audit(trainer, pl_module)
        if trainer.world_size > 1:
            # every rank reaches this point (the schedule is the same everywhere) and waits here
            # instead of at the next all-reduce; then EarlyStopping sees the metrics on each rank
            metrics = trainer.strategy.broadcast(metrics, src=0)
        for key, value in (metrics or {}).items():
            trainer.callback_metrics[key] = torch.tensor(value)

    def _audit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Rank 0: attack the held-out batch, log everything; the scalars (failure ones too)."""
        defense = find_gradient_defense(trainer) if self.apply_defenses else None
        inputs, targets = self._device_held_out(pl_module)
        start = time.perf_counter()
        description = f"InversionAudit: {type(self.attack).__name__}, step {trainer.global_step}"
        try:
            with measurement_progress(trainer, description, total=None):
                rec, mode = self._reconstruct(pl_module, inputs, targets, defense)
            scores = reconstruction_metrics(rec, (inputs.cpu(), targets.cpu()))
        except Exception as err:  # caught here, not by the base: the other ranks wait for rank 0
            if self.on_error == "raise":
                raise
            return self._report_failure(trainer, f"raised {type(err).__name__}: {err}")
        if not _finite(rec, scores):
            return self._report_failure(trainer, "returned NaN")
        threat = {
            "attack": type(self.attack).__name__,
            "defended": defense is not None,
            "placement": getattr(defense, "placement", "none") if defense is not None else "none",
            "bn_mode": mode,
            "bn_stats_known": mode == "eval",
            "labels_known": False,
        }
        metrics = {f"attack/{k}": float(v) for k, v in scores.items() if not math.isnan(v)}
        metrics["attack/failed"] = 0.0
        metrics["attack/seconds"] = time.perf_counter() - start
        metrics["attack/defended"] = float(threat["defended"])
        metrics["attack/labels_known"] = 0.0
        metrics["attack/bn_stats_known"] = float(threat["bn_stats_known"])
        self._record(trainer, metrics, threat, rec, inputs)
        return metrics

    def _report_failure(self, trainer: L.Trainer, what: str) -> dict[str, float]:
        """Warn and record (the policy), log the failure scalars; return them for the broadcast."""
        self._failed(trainer, what)
        metrics = self._failure_metrics()
        log_rank_zero(trainer, metrics, trainer.global_step)
        return metrics

    def _reconstruct(
        self, pl_module: L.LightningModule, inputs: Tensor, targets: Tensor, defense: Any
    ) -> tuple[Reconstruction, str]:
        """The attack on the defended gradient of ``(inputs, targets)``; and the BN mode."""
        model, loss_fn = self._adapted(pl_module), self._require_adapter().loss
        with isolated(pl_module, train=False, seed=self.seed), torch.enable_grad():
            observed = observed_gradients(
                model, inputs, targets, loss_fn=loss_fn, defense=defense, generator=self.generator
            )
            rec = self._attack().reconstruct(
                model,
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
        self._published.update(k for k in metrics if k != "attack/failed")
        self.last = rec
        self.history.append(
            {"step": step, "epoch": trainer.current_epoch, **metrics, "threat_model": threat}
        )
        self._log_threat_text(trainer, threat, step)
        if self.log_images and rec.inputs.is_floating_point() and rec.inputs.dim() == 4:
            self._log_images(trainer, inputs.cpu(), rec.inputs.detach().cpu(), step)

    @staticmethod
    def _log_threat_text(trainer: L.Trainer, threat: dict[str, Any], step: int) -> None:
        send_text(trainer, "attack/threat_model", json.dumps(threat), step)

    def _log_images(self, trainer: L.Trainer, truth: Tensor, rec: Tensor, step: int) -> None:
        send_image(trainer, reconstruction_grid(truth, rec), step, image_dir=self.image_dir)


def _finite(rec: Reconstruction, scores: dict[str, float]) -> bool:
    """Whether the reconstruction and its scores are numbers (label accuracy, SSIM may be NaN)."""
    finite = bool(torch.isfinite(rec.inputs.float()).all()) if rec.inputs.numel() else True
    return finite and not any(
        math.isnan(v) for k, v in scores.items() if k not in ("label_acc", "ssim")
    )
