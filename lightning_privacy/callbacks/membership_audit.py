"""Membership inference during training: does the model tell its training examples apart?

``MembershipAudit`` scores a fixed sample of training examples (members) and of held-out
examples (non-members) with a membership attack on a schedule, and logs how well the scores
separate them:

* ``membership/auc`` (with its 95 % DeLong interval ``membership/auc_low`` / ``auc_high``),
  ``membership/advantage`` (max TPR - FPR), ``membership/tpr_at_fpr_0.01`` and
  ``membership/tpr_at_fpr_0.001`` (NaN, with one note, when there are fewer than 1/FPR
  non-members to resolve that rate), ``membership/epsilon_lower_bound`` (the ε the attack proves
  with one-sided Clopper-Pearson bounds on both rates, at the δ of the Trainer's ``DPSGD`` if
  any, so it reads beside ``privacy/epsilon``);
* ``membership/class_<c>/...`` per class with ``per_class=True``;
* a ROC curve on log-log axes (the convention since LiRA) to every logger that takes images,
  tag ``membership/roc``, and to ``image_dir`` (files ``0600``); never the working directory.

The samples. Members default to ``num_samples`` examples drawn once from the training data
(the fit's train loader's data set) with the callback's own seed -- never the global RNG -- and
kept in the checkpoint as indices, so a resumed run scores the same examples. Non-members
default to as many drawn from the validation data. Either can be given (``members=`` /
``nonmembers=``: a data set, a loader or a batch). They are read into memory once and never
written anywhere: member examples are the user's sensitive data. Before training the callback
refuses, in one error naming the fix: fewer than 10 of either, members and non-members that
share an example, no data to draw from; and a reference-model attack without reference models
already in ``__init__``.

The attacks (:mod:`lightning_privacy.membership`): ``loss`` (the module's own training loss per
example, through the :class:`~lightning_privacy.ModelAdapter`), ``confidence``, ``entropy``,
``modified_entropy``; ``lira_offline`` and ``rmia`` with ``reference_models=`` trained without
the audited examples (``lightning-privacy audit membership`` trains them itself).

An observer like the others (``ScheduledObserver``): it runs after the optimizer step of
``every_n_train_steps`` or at the end of every ``every_n_epochs``-th epoch, in eval mode, without
gradients, with the global RNG forked; the weights, BatchNorm buffers and random streams of the
run are bitwise those of a run without it. A measurement that raises or returns NaN (other than
an unresolvable TPR) logs ``membership/failed = 1`` and NaN under its keys, warns once, and
training goes on (``on_error="raise"`` re-raises).

Example:
    >>> import lightning as L
    >>> from lightning_privacy.data import DigitsDataModule
    >>> from lightning_privacy.models import LeNetDLG, LitClassifier
    >>> audit = MembershipAudit("loss", num_samples=50, log_roc=False)
    >>> trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1,
    ...                     callbacks=[audit], logger=False, enable_progress_bar=False,
    ...                     enable_checkpointing=False, enable_model_summary=False)
    >>> module = LitClassifier(LeNetDLG(num_classes=10, channels=1, image_size=8))
    >>> trainer.fit(module, DigitsDataModule(image_size=8, batch_size=16))
    >>> 0.0 <= trainer.callback_metrics["membership/auc"].item() <= 1.0
    True
    >>> audit.history[0]["num_members"], audit.history[0]["num_nonmembers"]
    (50, 50)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_privacy._validation import check_bool, check_float, check_int
from lightning_privacy.adapters import ModelAdapter, check_adapter, resolve_adapter
from lightning_privacy.callbacks import _trainer_internals as internals
from lightning_privacy.callbacks._images import check_image_dir, send_image
from lightning_privacy.callbacks._membership_data import ExampleSource, draw_indices, overlap
from lightning_privacy.callbacks._observer import ScheduledObserver, isolated
from lightning_privacy.functional import membership as F
from lightning_privacy.membership import (
    MembershipAttack,
    MembershipQuery,
    create_membership_attack,
)

__all__ = ["MembershipAudit", "accountant_privacy", "forward_logits", "resolve_membership_attack"]

#: The fewest members or non-members an audit accepts.
MIN_EXAMPLES = 10
#: δ of the ε lower bound when the Trainer has no accountant.
DEFAULT_DELTA = 1e-5


def resolve_membership_attack(attack: Any) -> MembershipAttack:
    """A membership attack from a registered name or an instance (checked).

    Example:
        >>> type(resolve_membership_attack("entropy")).__name__
        'EntropyAttack'
    """
    if isinstance(attack, str):
        return create_membership_attack(attack)
    if not isinstance(attack, MembershipAttack):
        raise TypeError(
            "Expected `attack` to be a membership attack name (lightning_privacy.membership."
            f"list_membership_attacks()) or a MembershipAttack, but got {type(attack).__name__}."
        )
    return attack


def _reference_problems(attack: MembershipAttack) -> list[str]:
    """A reference-model attack without its reference models (or RMIA without a population)."""
    name = type(attack).__name__
    models = getattr(attack, "reference_models", ())
    problems = []
    if attack.needs_reference and not models:
        problems.append(
            f"{name} needs reference models: pass attack={name}(reference_models=[...]) with "
            "modules trained like yours but without the audited examples, or run "
            "`lightning-privacy audit membership --config audit.yaml`, which trains them"
        )
    if attack.needs_population and getattr(attack, "population", None) is None:
        problems.append(
            f"{name} needs population samples nobody trained on: pass {name}(population="
            "(inputs, targets), ...)"
        )
    return problems


def forward_logits(
    module: nn.Module, adapter: ModelAdapter, inputs: Tensor, *, batch_size: int
) -> Tensor:
    """The module's outputs on ``inputs``, in chunks, on its device; returned on the CPU.

    Call it inside :func:`~lightning_privacy.callbacks._observer.isolated` and ``no_grad``.
    """
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size].to(device)
        out = adapter.forward(module, chunk)
        if not isinstance(out, Tensor) or out.ndim != 2:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                "Expected the module's outputs to be (batch, classes) logits for a membership "
                f"attack, but got {shape}; pass a ModelAdapter(forward_fn=...) that returns them."
            )
        outputs.append(out.detach().float().cpu())
    return torch.cat(outputs)


def accountant_privacy(trainer: L.Trainer) -> tuple[float | None, float | None]:
    """``(epsilon, delta)`` of the Trainer's accountant: ``DPSGD``'s, else the logged values.

    ``GradientDefense`` with a formal mechanism logs ``privacy/epsilon`` and ``privacy/delta``
    each epoch; ``(None, None)`` when nothing accounts.
    """
    from lightning_privacy.callbacks.dpsgd import DPSGD

    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, DPSGD) and callback.delta is not None:
            return float(callback.epsilon), float(callback.delta)
    metrics = trainer.callback_metrics
    eps, delta = metrics.get("privacy/epsilon"), metrics.get("privacy/delta")
    return (
        None if eps is None else float(eps),
        None if delta is None else float(delta),
    )


class MembershipAudit(ScheduledObserver):
    """Score members against non-members with a membership attack on a schedule; log the ROC.

    Args:
        attack: A registered membership attack (``"loss"``, ``"confidence"``, ``"entropy"``,
            ``"modified_entropy"``, ``"lira_offline"``, ``"rmia"``) or a configured
            :class:`~lightning_privacy.membership.MembershipAttack` (reference-model attacks
            need ``reference_models=``).
        every_n_epochs: Measure at the end of every n-th training epoch.
        every_n_train_steps: Measure after every n-th optimizer step (not both; neither means
            once per epoch).
        members: Training examples to score (a data set, loader or batch); default: drawn from
            the training data.
        nonmembers: Held-out examples (same forms); default: drawn from the validation data.
        num_samples: How many of each to draw (at least 10; all when a set is smaller).
        per_class: Also log every metric per class (``membership/class_<c>/...``).
        adapter: How to split a batch and call the module
            (:class:`~lightning_privacy.ModelAdapter`); default: the module's
            ``privacy_adapter``, else ``ModelAdapter()``.
        seed: Seed of the sample draw (the callback's own; never the global RNG).
        delta: δ of ``membership/epsilon_lower_bound``; default: the Trainer's ``DPSGD`` δ,
            else ``privacy/delta`` as logged, else 1e-5.
        confidence: Confidence of the ε lower bound and of the AUC interval.
        batch_size: Examples per forward pass while scoring.
        log_roc: Send the ROC curve to the loggers.
        image_dir: Also write the ROC curves as PNG files here (``0600``).
        on_error: ``"warn"`` (a failed measurement warns, training goes on) or ``"raise"``.

    Attributes:
        history: One dict per measurement (step, epoch, the metrics, sample sizes, δ).
        last_scores: ``{"members": ..., "nonmembers": ...}`` scores of the last measurement
            (in memory only).

    Example:
        >>> audit = MembershipAudit("modified_entropy", every_n_train_steps=100, num_samples=200)
        >>> type(audit.attack).__name__, audit.schedule.every_n_train_steps
        ('ModifiedEntropyAttack', 100)
        >>> try:
        ...     MembershipAudit("lira_offline")
        ... except ValueError as err:
        ...     print(str(err)[:62])
        MembershipAudit cannot run: LiRAOffline needs reference models
    """

    metric_prefix = "membership"

    def __init__(
        self,
        attack: str | MembershipAttack = "loss",
        *,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        members: Any = None,
        nonmembers: Any = None,
        num_samples: int = 500,
        per_class: bool = False,
        adapter: ModelAdapter | None = None,
        seed: int = 0,
        delta: float | None = None,
        confidence: float = 0.95,
        batch_size: int = 256,
        log_roc: bool = True,
        image_dir: str | Path | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            seed=seed,
            on_error=on_error,
        )
        self.attack = resolve_membership_attack(attack)
        self.num_samples = check_int("num_samples", num_samples, low=MIN_EXAMPLES)
        self.per_class = check_bool("per_class", per_class)
        if adapter is not None and not isinstance(adapter, ModelAdapter):
            raise TypeError(
                "Expected `adapter` to be a lightning_privacy.ModelAdapter, but got "
                f"{type(adapter).__name__}."
            )
        self.adapter = adapter
        self.delta = (
            None
            if delta is None
            else check_float("delta", delta, low=0.0, high=1.0, low_open=True, high_open=True)
        )
        self.confidence = check_float(
            "confidence", confidence, low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.log_roc = check_bool("log_roc", log_roc)
        self.image_dir = check_image_dir(image_dir)
        problems = _reference_problems(self.attack) + self._given_problems(members, nonmembers)
        if problems:
            raise ValueError("MembershipAudit cannot run: " + "; ".join(problems) + ".")
        self.members, self.nonmembers = members, nonmembers
        self.last_scores: dict[str, Tensor] | None = None
        self._adapter: ModelAdapter | None = None
        self._sources: dict[str, ExampleSource] = {}
        self._indices: dict[str, Tensor | None] = {"members": None, "nonmembers": None}
        self._restored: dict[str, list[int] | None] = {}
        self._data: dict[str, tuple[Tensor, Tensor]] = {}
        self._reference: dict[str, Tensor] = {}
        self._noted_nan: set[str] = set()

    # ------------------------------------------------------------------ checks
    def _given_problems(self, members: Any, nonmembers: Any) -> list[str]:
        """What is wrong with the sets given in ``__init__`` (checked before any Trainer)."""
        problems, read = [], {}
        for name, value in (("members", members), ("nonmembers", nonmembers)):
            if value is None:
                continue
            try:
                source = ExampleSource.of(value)
            except TypeError as err:
                problems.append(f"`{name}`: {err}".rstrip("."))
                continue
            if source.kind == "batch":
                try:
                    read[name] = source.read(
                        torch.arange(source.size or 0), self.adapter or ModelAdapter()
                    )
                except TypeError as err:
                    problems.append(f"`{name}`: {err}".rstrip("."))
        return problems + _sample_problems(read)

    def _defining_arguments(self) -> dict[str, Any]:
        return {
            **super()._defining_arguments(),
            "attack": repr(self.attack),
            "num_samples": self.num_samples,
            "per_class": self.per_class,
        }

    def _subject(self) -> str:
        return f"the {type(self.attack).__name__} membership attack"

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Draw and read the members and non-members; refuse bad samples before training."""
        if stage != "fit":
            return
        self._adapter = resolve_adapter(pl_module, self.adapter)
        problems = self._find_sources(trainer)
        if not problems:
            with isolated(pl_module, train=pl_module.training, seed=self.seed):
                for name in ("members", "nonmembers"):
                    self._indices[name] = self._draw(name)
                    self._data[name] = self._read(name)
            problems = _sample_problems(self._data)
        if problems:
            raise ValueError("MembershipAudit cannot run: " + "; ".join(problems) + ".")

    def _find_sources(self, trainer: L.Trainer) -> list[str]:
        """Where members and non-members come from (the user's sets or the Trainer's data)."""
        problems = []
        loaders = {
            "members": internals.train_dataloader_before_fit(trainer),
            "nonmembers": _validation_loader(trainer),
        }
        what = {"members": "training", "nonmembers": "validation"}
        for name, given in (("members", self.members), ("nonmembers", self.nonmembers)):
            value = given if given is not None else loaders[name]
            if value is None:
                problems.append(
                    f"no {what[name]} data to draw {name} from: pass `{name}=` (a data set, "
                    "loader or batch)"
                )
                continue
            source = ExampleSource.of(value)
            if name == "members" and source.kind == "loader":
                problems.append(
                    "the training data is an iterable data set, which cannot be sampled: pass "
                    "`members=` (a map-style data set or a batch of training examples)"
                )
            self._sources[name] = source
        return problems

    def _draw(self, name: str) -> Tensor | None:
        source = self._sources[name]
        if source.size is None:
            return None
        restored = self._restored.get(name)
        if restored is not None:
            return torch.tensor(restored, dtype=torch.long)
        stream = 0 if name == "members" else 1
        return draw_indices(source.size, self.num_samples, seed=self.seed * 2 + stream)

    def _read(self, name: str) -> tuple[Tensor, Tensor]:
        return self._sources[name].read(
            self._indices[name], self._require_adapter(), limit=self.num_samples
        )

    def _require_adapter(self) -> ModelAdapter:
        if self._adapter is None:
            raise RuntimeError("MembershipAudit.setup() must run before training hooks.")
        return self._adapter

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Re-read a sample restored from a checkpoint; check the adapter; score the references."""
        changed = [n for n in ("members", "nonmembers") if self._restored.get(n) is not None]
        if changed:
            with isolated(pl_module, train=pl_module.training, seed=self.seed):
                for name in changed:
                    self._indices[name] = self._draw(name)
                    self._data[name] = self._read(name)
            self._restored.clear()
            problems = _sample_problems(self._data)
            if problems:
                raise ValueError("MembershipAudit cannot run: " + "; ".join(problems) + ".")
        adapter = self._require_adapter()
        inputs, targets = (t[:2].to(pl_module.device) for t in self._data["members"])
        with isolated(pl_module, train=False, seed=self.seed), torch.enable_grad():
            problems = check_adapter(pl_module, adapter, inputs, targets, continuous=False)
        if problems:
            raise ValueError(
                "MembershipAudit cannot score the module's outputs: " + "; ".join(problems) + "."
            )
        self._score_references(pl_module)

    def _score_references(self, pl_module: L.LightningModule) -> None:
        """The reference models' outputs on the sample (and population), once, before training."""
        models = getattr(self.attack, "reference_models", ())
        if not models:
            return
        adapter = self._require_adapter()
        inputs = torch.cat([self._data["members"][0], self._data["nonmembers"][0]])
        population = getattr(self.attack, "population", None)
        if population is not None:
            self._data["population"] = ExampleSource.of(population).read(
                torch.arange(ExampleSource.of(population).size or 0), adapter
            )
        logits, pop_logits = [], []
        with torch.no_grad():
            for model in models:
                with isolated(model, train=False, seed=self.seed, differentiable=False):
                    logits.append(
                        forward_logits(model, adapter, inputs, batch_size=self.batch_size)
                    )
                    if population is not None:
                        x = self._data["population"][0]
                        pop_logits.append(
                            forward_logits(model, adapter, x, batch_size=self.batch_size)
                        )
        self._reference["logits"] = torch.stack(logits)
        if pop_logits:
            self._reference["population"] = torch.stack(pop_logits)

    # ------------------------------------------------------------------ measurement
    def _query(self, pl_module: L.LightningModule) -> MembershipQuery:
        adapter = self._require_adapter()
        (xm, ym), (xn, yn) = self._data["members"], self._data["nonmembers"]
        forward_only = isolated(pl_module, train=False, seed=self.seed, differentiable=False)
        with forward_only, torch.no_grad():
            logits = forward_logits(
                pl_module, adapter, torch.cat([xm, xn]), batch_size=self.batch_size
            )
            pop = self._data.get("population")
            pop_logits = (
                None
                if pop is None
                else forward_logits(pl_module, adapter, pop[0], batch_size=self.batch_size)
            )
        return MembershipQuery(
            logits,
            torch.cat([ym, yn]),
            loss_fn=adapter.loss,
            reference_logits=self._reference.get("logits"),
            population_logits=pop_logits,
            population_targets=None if pop is None else pop[1],
            population_reference_logits=self._reference.get("population"),
        )

    def _observe(self, trainer: L.Trainer, pl_module: L.LightningModule, *, on_step: bool) -> None:
        query = self._query(pl_module)
        scores = self.attack.score(query).detach().cpu().double()
        m = len(self._data["members"][1])
        members, nonmembers = scores[:m], scores[m:]
        delta = self._delta(trainer)
        metrics = _prefixed("membership", self._summary(members, nonmembers, delta))
        if self.per_class:
            metrics.update(self._per_class(members, nonmembers, delta))
        bad = self._first_nan({k: v for k, v in metrics.items() if not _resolvable(k)})
        if bad is not None:
            self._failed(trainer, f"returned NaN ({bad})")
            self._publish(trainer, pl_module, self._failure_metrics(), on_step=on_step)
            return
        self._note_unresolved(metrics, len(nonmembers))
        self._publish(trainer, pl_module, {**metrics, "membership/failed": 0.0}, on_step=on_step)
        self.last_scores = {"members": members, "nonmembers": nonmembers}
        self.history.append(
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                **metrics,
                "attack": type(self.attack).__name__,
                "num_members": m,
                "num_nonmembers": len(nonmembers),
                "num_reference_models": query.num_reference_models,
                "delta": delta,
            }
        )
        if self.log_roc and trainer.is_global_zero:
            self._send_roc(trainer, members, nonmembers)

    def _summary(self, members: Tensor, nonmembers: Tensor, delta: float) -> dict[str, float]:
        return F.membership_summary(members, nonmembers, delta=delta, confidence=self.confidence)

    def _delta(self, trainer: L.Trainer) -> float:
        if self.delta is not None:
            return self.delta
        _, delta = accountant_privacy(trainer)
        return DEFAULT_DELTA if delta is None else delta

    def _per_class(self, members: Tensor, nonmembers: Tensor, delta: float) -> dict[str, float]:
        """The metrics of each class with at least 10 members and 10 non-members."""
        ym, yn = self._data["members"][1].reshape(-1), self._data["nonmembers"][1].reshape(-1)
        metrics: dict[str, float] = {}
        for c in sorted(set(ym.tolist()) & set(yn.tolist())):
            a, b = members[ym == c], nonmembers[yn == c]
            if len(a) < MIN_EXAMPLES or len(b) < MIN_EXAMPLES:
                continue
            summary = self._summary(a, b, delta)
            metrics.update(_prefixed(f"membership/class_{int(c)}", summary))
        return metrics

    def _note_unresolved(self, metrics: Mapping[str, float], nonmembers: int) -> None:
        """Say once why a TPR at a low FPR is NaN (too few non-members to resolve the rate)."""
        new = [
            k
            for k, v in metrics.items()
            if _resolvable(k) and math.isnan(v) and k not in self._noted_nan
        ]
        if not new:
            return
        self._noted_nan.update(new)
        rates = sorted({float(k.rsplit("_", 1)[1]) for k in new})
        need = ", ".join(f"{math.ceil(1 / r)} for an FPR of {r:g}" for r in rates)
        rank_zero_warn(
            f"MembershipAudit: {', '.join(new[:4])}{' ...' if len(new) > 4 else ''} NaN: "
            f"{nonmembers} non-members (fewer in a class) cannot resolve the rate (it needs "
            f"{need}); give more non-members (num_samples=, nonmembers=) to measure it.",
            category=UserWarning,
        )

    def _send_roc(self, trainer: L.Trainer, members: Tensor, nonmembers: Tensor) -> None:
        from lightning_privacy.membership.plots import roc_image

        fpr, tpr, _ = F.roc_curve(members, nonmembers)
        name = type(self.attack).__name__
        image = roc_image({name: (fpr, tpr)}, title=f"step {trainer.global_step}")
        send_image(
            trainer,
            image,
            trainer.global_step,
            image_dir=self.image_dir,
            key="membership/roc",
            folder="membership_audit",
            owner="MembershipAudit",
            what="ROC curve",
        )

    # ------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        """The base state plus the sample's indices (never the examples themselves)."""
        state = super().state_dict()
        for name, indices in self._indices.items():
            state[f"{name}_indices"] = None if indices is None else indices.tolist()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history, the generator and the sample (re-read at fit start)."""
        super().load_state_dict(state_dict)
        for name in ("members", "nonmembers"):
            self._restored[name] = state_dict.get(f"{name}_indices")


def _prefixed(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in values.items()}


def _resolvable(key: str) -> bool:
    """A key that is NaN by design when the non-members cannot resolve its rate."""
    return "/tpr_at_fpr_" in key


def _sample_problems(data: Mapping[str, tuple[Tensor, Tensor]]) -> list[str]:
    """Too few members or non-members, or examples in both."""
    problems = []
    for name, (inputs, _) in data.items():
        if name in ("members", "nonmembers") and len(inputs) < MIN_EXAMPLES:
            problems.append(
                f"Expected at least {MIN_EXAMPLES} {name}, but got {len(inputs)}: an ROC of fewer "
                "examples says nothing"
            )
    if "members" in data and "nonmembers" in data:
        shared = overlap(data["members"], data["nonmembers"])
        if shared:
            problems.append(
                f"members and nonmembers overlap: {shared} non-member example(s) equal a member "
                "(inputs and target); an example cannot be both, so pass disjoint sets"
            )
    return problems


def _validation_loader(trainer: L.Trainer) -> Any:
    """The validation loader of the fit (``None``: none), read before Lightning shards it."""
    source = internals.validation_source(trainer)
    if source is None or not source.is_defined():
        return None
    loader = source.dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    return loader
