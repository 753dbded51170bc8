"""``LeakageMonitor``: a per-step I2F estimate of how well a perfect attacker inverts the gradient.

Hook: after an optimizer step (``on_train_batch_end`` when ``global_step`` hits
``every_n_train_steps``) or at the end of a training epoch (``every_n_epochs``; neither means
once per epoch). It never runs in validation hooks (I2F needs autograd).

What it estimates (the threat model): each example of a held-out batch -- ``batch=`` or the
first validation batch, exactly as ``InversionAudit`` chooses it -- is taken as a gradient shared
alone (batch size 1: the most exposed case and the I2F paper's protocol), defended by the same
``GradientTransform`` pipeline and ``layers=`` as the Trainer's ``GradientDefense`` (with this
callback's own generator). A perfect attacker with the label then misses the input by about the
Inversion Influence Function (Zhang et al., NeurIPS 2023)::

    I2F(δ) = ‖(J Jᵀ)⁻¹ J δ‖,   J = ∇_x ∇_θ L,   δ = defended - original gradient

and reaches ``PSNR = 10 log10(range² / (I2F² / d_x))``. Estimators: ``"exact"`` (the default: I2F
of ``num_delta_samples`` draws of δ, any pipeline; ``J Jᵀ`` is factorised once per example and
reused for every draw), ``"approximate"`` (the same draws by preconditioned conjugate gradients
stopped early: a fraction of the cost on large models, a few per cent low), ``"expected"``
(``sqrt(E I2F²) = std sqrt(tr((JJᵀ)⁻¹))`` in closed form for
``[deterministic transforms..., GaussianNoise(std)]``) and ``"lower_bound"`` (``‖J δ‖ / λ_max``: the
cheapest, but it only tracks the noise size -- on the DLG LeNet it is ~1e4 below the exact value
and ranks images no better than ``‖δ‖`` alone; do not read it as the leakage). The model is
evaluated in eval mode (dropout off, BatchNorm running statistics).

Cost per estimate: ``num_samples`` assemblies and Cholesky factorisations of the ``d_x x d_x``
matrix ``J Jᵀ`` (``d_x`` columns, formed many at a time by layer rules; about 0.6 s for the DLG
LeNet on a 32x32 grayscale image on one CPU thread), then one ``J δ`` product per δ draw. Inputs
larger than 4,096 values switch to matrix-free conjugate gradients preconditioned by the first
layers' Gram matrix. The README's I2F section has the cost on common models, in training steps.
Before training the monitor times one example (:func:`~lightning_privacy.leakage.estimate_cost`):
if one example alone would take longer than ``max_seconds`` (120 s by default) it refuses with
the fix (``num_samples=``, ``layers=``, a cheaper estimator); if ``num_samples`` would, it warns.
Each measurement stops at the bound: no example starts after it, the one running then is dropped,
``leakage/examples`` logs how many were estimated (and a warning says so once).

The user's module: the held-out batch, the call and the loss come from a
:class:`~lightning_privacy.ModelAdapter`, as for ``InversionAudit`` (checked once before
training, and compared with ``training_step``'s loss); token inputs are estimated on their
embeddings (the adapter's ``embed_fn``/``forward_embedded_fn``).

Guarantee: none -- I2F is a first-order estimate around a perfect attacker, not a bound on every
attack. It tracks converged L-BFGS attacks on small sigmoid networks (see the README); it can be
off for highly non-convex losses or large perturbations. ``leakage/relative_perturbation`` logs
``‖δ‖ / ‖g‖``; once it passes ``VALIDATED_RELATIVE_PERTURBATION`` (6 %, the range the README
checked) the callback warns once that the estimate has left the range where it is calibrated.

Trajectory: the estimate works on ``torch.func.functional_call`` with detached parameters and
cloned buffers inside a forked RNG, and restores train/eval mode, so the training run is bitwise
the same with or without it.

Logged keys (``pl_module.log``; every rank computes the same values from the same held-out batch
and seed): ``leakage/i2f`` (batch mean), ``leakage/i2f_lower_bound``, ``leakage/lambda_max``,
``leakage/predicted_psnr`` (batch mean), ``leakage/worst_sample_predicted_psnr``,
``leakage/worst_class_predicted_psnr``, ``leakage/relative_perturbation`` (batch mean),
``leakage/lanczos_iterations`` and, with
``per_class=True``, ``leakage/predicted_psnr/class_<c>``. With ``max_predicted_psnr`` the worst
sample's predicted PSNR is compared to it: ``on_exceed="warn"`` warns, ``"stop"`` stops training
(agreed across ranks, like ``EarlyStopping``).

Example:
    >>> import lightning as L
    >>> from lightning_privacy.callbacks import GradientDefense
    >>> from lightning_privacy.data import load_digits_tensors
    >>> from lightning_privacy.defenses import GaussianNoise
    >>> from lightning_privacy.models import LeNetDLG, LitClassifier
    >>> x, y = load_digits_tensors(image_size=8)
    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:32], y[:32]), 16)
    >>> monitor = LeakageMonitor(every_n_train_steps=2, batch=(x[-2:], y[-2:]), num_samples=1)
    >>> trainer = L.Trainer(max_steps=2, callbacks=[GradientDefense([GaussianNoise(std=1e-3)]),
    ...                     monitor], logger=False, enable_progress_bar=False,
    ...                     enable_checkpointing=False, enable_model_summary=False)
    >>> trainer.fit(LitClassifier(LeNetDLG(10, 1, 8, width=4), lr=0.1), loader)
    >>> metrics = trainer.callback_metrics
    >>> "leakage/predicted_psnr" in metrics, metrics["leakage/failed"].item()
    (True, 0.0)
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_privacy._validation import check_bool, check_choice, check_float, check_int
from lightning_privacy.adapters import ModelAdapter
from lightning_privacy.callbacks._budget import StopReason, stop_training_if
from lightning_privacy.callbacks._gradient_view import GradientObserver, find_gradient_defense
from lightning_privacy.callbacks._observer import isolated
from lightning_privacy.callbacks._progress import measurement_progress
from lightning_privacy.leakage import (
    ESTIMATORS,
    VALIDATED_RELATIVE_PERTURBATION,
    LeakageEstimate,
    create_estimator,
    estimate_cost,
    estimate_leakage,
)

__all__ = ["LeakageMonitor"]


class LeakageMonitor(GradientObserver):
    """Log I2F leakage estimates of the defended gradient during training.

    Args:
        every_n_train_steps: Run after every n-th optimizer step.
        every_n_epochs: Run at the end of every n-th training epoch (default when neither given).
        batch: The held-out batch, in any format the adapter unpacks; default: the first
            validation batch.
        estimator: A registered estimator (``lightning_privacy.leakage.list_estimators()``:
            ``"exact"``, ``"approximate"``, ``"expected"``, ``"lower_bound"``; see the module
            docs).
        num_delta_samples: δ draws per example (``"exact"``, ``"approximate"``,
            ``"lower_bound"``).
        max_predicted_psnr: Threshold in dB on the worst example's predicted PSNR, or ``None``.
        on_exceed: ``"warn"`` or ``"stop"`` when the threshold is passed.
        num_samples: Examples of the held-out batch to estimate (each one ``J Jᵀ`` assembly).
        per_class: Also log the mean predicted PSNR of every class present.
        damping: ``λ >= 0`` in ``(J Jᵀ + λ I)⁻¹`` (keep 0: damping hides which images leak).
        data_range: Value range of the inputs (1 for images in [0, 1]).
        adapter: How to replay the training loss (:class:`~lightning_privacy.ModelAdapter`).
        max_seconds: Wall-time bound of one measurement (see the cost paragraph above).
        on_error: ``"warn"`` (a failed estimate warns and training goes on) or ``"raise"``.
        seed: Seed of the callback's own generator (defense draws, Lanczos starts).
    """

    def __init__(
        self,
        *,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        batch: Any = None,
        estimator: str = "exact",
        num_delta_samples: int = 4,
        max_predicted_psnr: float | None = None,
        on_exceed: str = "warn",
        num_samples: int = 4,
        per_class: bool = False,
        damping: float = 0.0,
        data_range: float = 1.0,
        adapter: ModelAdapter | None = None,
        max_seconds: float | None = 120.0,
        on_error: str = "warn",
        seed: int = 0,
    ) -> None:
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
        self.estimator = check_choice("estimator", estimator, ESTIMATORS)
        self.num_delta_samples = check_int("num_delta_samples", num_delta_samples, low=1)
        self.max_predicted_psnr = (
            None
            if max_predicted_psnr is None
            else check_float("max_predicted_psnr", max_predicted_psnr)
        )
        self.on_exceed = check_choice("on_exceed", on_exceed, ("warn", "stop"))
        self.per_class = check_bool("per_class", per_class)
        self.damping = check_float("damping", damping, low=0.0)
        self.data_range = check_float("data_range", data_range, low=0.0, low_open=True)
        self.last: LeakageEstimate | None = None
        self._warned_range = False
        self._warned_budget = False

    def _defining_arguments(self) -> dict[str, Any]:
        return {
            **super()._defining_arguments(),
            "estimator": self.estimator,
            "num_samples": self.num_samples,
            "num_delta_samples": self.num_delta_samples,
        }

    metric_prefix = "leakage"
    clamp_num_samples = True

    def _subject(self) -> str:
        return f"the {self.estimator!r} I2F estimate"

    def _setup_problems(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        defense = find_gradient_defense(trainer)
        if defense is None:
            rank_zero_warn(
                "LeakageMonitor found no GradientDefense: the gradient is shared undefended "
                "(δ = 0), a perfect attacker recovers the inputs exactly, and leakage/i2f is 0."
            )
            return []
        try:
            create_estimator(self.estimator).check_defense(defense.transforms)
        except ValueError as err:
            return [str(err).rstrip(".")]
        return []

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Replay the loss once (see the base class), then refuse a measurement too slow to run."""
        super().on_fit_start(trainer, pl_module)
        if self.max_seconds is None:
            return
        model, inputs, targets = self._estimation_inputs(pl_module)
        with isolated(pl_module, train=False, seed=self.seed), torch.enable_grad():
            cost = estimate_cost(
                model,
                inputs,
                targets,
                estimator=self.estimator,
                loss_fn=self._require_adapter().loss,
                num_delta_samples=self.num_delta_samples,
            )
        self._check_cost(cost.seconds_per_example, len(inputs), cost.input_dim)

    def _check_cost(self, per_example: float, examples: int, input_dim: int) -> None:
        assert self.max_seconds is not None
        cheaper = (
            ""
            if self.estimator == "lower_bound"
            else "use estimator='lower_bound' (a bound, not a prediction), "
        )
        fix = (
            f"an input of {input_dim} values: {cheaper}restrict the observed parameters with "
            "`layers=`, or raise `max_seconds`"
        )
        if per_example > self.max_seconds:
            raise ValueError(
                f"LeakageMonitor: one {self.estimator!r} estimate of one example would take about "
                f"{per_example:.0f} s on this model, more than max_seconds={self.max_seconds} ("
                f"{fix})."
            )
        if examples * per_example > self.max_seconds:
            fitting = max(1, int(self.max_seconds // per_example))
            rank_zero_warn(
                f"LeakageMonitor: {examples} examples would take about "
                f"{examples * per_example:.0f} s per measurement, more than max_seconds="
                f"{self.max_seconds}; each measurement stops after about {fitting} (pass "
                f"num_samples={fitting}, every_n_epochs= for fewer measurements, or {fix})."
            )

    def _estimation_inputs(self, pl_module: L.LightningModule) -> tuple[nn.Module, Tensor, Tensor]:
        """The model ``inputs -> outputs`` and the held-out inputs (embedded for token ids)."""
        inputs, targets = self._device_held_out(pl_module)
        if inputs.is_floating_point():
            return self._adapted(pl_module), inputs, targets
        with isolated(pl_module, train=False, seed=self.seed), torch.no_grad():
            embedded = self._require_adapter().embed(pl_module, inputs)
        return self._adapted(pl_module, embedded=True), embedded, targets

    def _observe(self, trainer: L.Trainer, pl_module: L.LightningModule, *, on_step: bool) -> None:
        defense = find_gradient_defense(trainer)
        model, inputs, targets = self._estimation_inputs(pl_module)
        description = f"LeakageMonitor: {self.estimator} I2F, step {trainer.global_step}"
        with (
            isolated(pl_module, train=False, seed=self.seed),
            torch.enable_grad(),
            measurement_progress(trainer, description, total=len(inputs)) as advance,
        ):
            estimate = estimate_leakage(
                model,
                inputs,
                targets,
                transforms=list(defense.transforms) if defense is not None else [],
                estimator=self.estimator,
                num_delta_samples=self.num_delta_samples,
                damping=self.damping,
                loss_fn=self._require_adapter().loss,
                defense_layers=defense.layers if defense is not None else None,
                data_range=self.data_range,
                generator=self.generator,
                max_seconds=self.max_seconds,
                progress=advance,
            )
        metrics = estimate.metrics(per_class=self.per_class)
        nan = self._first_nan(metrics)
        if nan is not None:
            raise FloatingPointError(f"the estimate is NaN ({nan}): has the model diverged?")
        metrics["leakage/lanczos_iterations"] = float(
            sum(r.iterations for r in estimate.lanczos) / max(len(estimate.lanczos), 1)
        )
        metrics["leakage/examples"] = float(len(estimate.per_sample_i2f))
        self.last = estimate
        self._publish(trainer, pl_module, {**metrics, "leakage/failed": 0.0}, on_step=on_step)
        self.history.append({"step": float(trainer.global_step), **metrics})
        self._check_range(estimate)
        self._check_budget(estimate)
        self._check_threshold(trainer, estimate)

    def _check_budget(self, estimate: LeakageEstimate) -> None:
        if self._warned_budget or estimate.complete:
            return
        self._warned_budget = True
        rank_zero_warn(
            f"LeakageMonitor: max_seconds={self.max_seconds} ran out after "
            f"{len(estimate.per_sample_i2f)} of {estimate.requested} examples; the logged values "
            "cover those (leakage/examples). Pass a smaller num_samples, a cheaper estimator "
            "('approximate') or a larger max_seconds."
        )

    def _check_range(self, estimate: LeakageEstimate) -> None:
        if self._warned_range or not estimate.beyond_validated_range:
            return
        self._warned_range = True
        rank_zero_warn(
            f"‖δ‖/‖g‖ reaches {float(estimate.relative_perturbation.max()):.3f} on the held-out "
            f"batch, past the {VALIDATED_RELATIVE_PERTURBATION:.0%} up to which the I2F was "
            "checked against a converged attack. Beyond it the first-order estimate is not "
            "calibrated: read leakage/predicted_psnr as a rough figure (in those checks an "
            "unclamped attack then did worse than predicted, while an attack clamped to the valid "
            "input range never scores below a constant image)."
        )

    def _check_threshold(self, trainer: L.Trainer, estimate: LeakageEstimate) -> None:
        if self.max_predicted_psnr is None:
            return
        worst = estimate.worst_sample_predicted_psnr
        message = (
            f"Predicted attack PSNR {worst:.2f} dB (worst held-out example) exceeds "
            f"max_predicted_psnr={self.max_predicted_psnr} at step {trainer.global_step}."
        )
        exceeded = bool(worst > self.max_predicted_psnr)
        if self.on_exceed == "stop":
            stop_training_if(
                trainer,
                exceeded,
                reason=StopReason.LEAKAGE_THRESHOLD,
                message=message + " Stopping training.",
            )
        elif trainer.strategy.reduce_boolean_decision(exceeded, all=False):
            rank_zero_warn(message + " Strengthen the defense (see calibrate_noise).")
