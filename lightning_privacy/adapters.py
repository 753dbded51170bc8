"""How an observer replays the user's training loss on a held-out batch: :class:`ModelAdapter`.

The observers (``InversionAudit``, ``LeakageMonitor``, ...) compute the gradient a batch would
produce, attack it or estimate its leakage. For that they need four things of the user's module
that Lightning does not say: how a batch splits into inputs and targets, how the module is called
on the inputs, which loss (and reduction) ``training_step`` uses, and -- for token models -- how
token ids become the continuous embeddings an attacker optimises. A :class:`ModelAdapter` says
them; the defaults cover ``(x, y, ...)`` batches, dicts with the usual keys, ``module(x)`` (with
Hugging Face-style outputs unwrapped to ``.logits``) and the module's ``loss_fn`` attribute.

:class:`AdaptedModel` turns a module and an adapter into a plain ``nn.Module`` ``x -> outputs``
with the module's own parameter names, which is what the attacks and the I²F operate on.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> net = torch.nn.Linear(3, 4)
    >>> adapter = ModelAdapter(loss_fn=lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1))
    >>> inputs, targets = adapter.unpack({"image": torch.rand(2, 3), "label": torch.tensor([0, 3])})
    >>> loss = adapter.loss(adapter.forward(net, inputs), targets)
    >>> loss.ndim, [n for n, _ in AdaptedModel(net, adapter).named_parameters()]
    (0, ['weight', 'bias'])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "INPUT_KEYS",
    "TARGET_KEYS",
    "AdaptedModel",
    "ModelAdapter",
    "check_adapter",
    "lightning_demo_transformer",
    "resolve_adapter",
    "token_model",
]

#: Keys a dict batch's inputs are looked up under, in order.
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "input_ids")
#: Keys a dict batch's targets are looked up under, in order.
TARGET_KEYS = ("y", "label", "labels", "target", "targets")

LossFn = Callable[[Any, Tensor], Tensor]
ForwardFn = Callable[[nn.Module, Tensor], Any]


@dataclass(frozen=True)
class ModelAdapter:
    """What an observer needs to replay the training loss of a module on a held-out batch.

    Every field is optional; the defaults suit a classifier trained with ``(x, y)`` batches and
    cross-entropy. For more, subclass and override the methods (the fields are what they read).

    Args:
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` with the loss *and reduction* of
            ``training_step`` (label smoothing, class weights, focal, BCE, ...). ``None``: the
            module's ``loss_fn`` (or ``criterion``) attribute, else mean cross-entropy
            (:func:`resolve_adapter` fills it in and says which).
        input_key: The key of the inputs in a dict batch (default: the first of
            :data:`INPUT_KEYS` present).
        target_key: The key of the targets in a dict batch (default: the first of
            :data:`TARGET_KEYS` present).
        forward_fn: ``forward_fn(module, inputs) -> outputs`` (default ``module(inputs)``, and an
            output with ``.logits`` / ``["logits"]`` is unwrapped to it).
        embed_fn: ``embed_fn(module, token_ids) -> embeddings``: the continuous inputs of a token
            model, which the I²F and the continuous attacks reconstruct.
        forward_embedded_fn: ``forward_embedded_fn(module, embeddings) -> outputs``: the model
            from the embeddings on (needed with ``embed_fn``).
        loss_source: How ``loss_fn`` was chosen (set by :func:`resolve_adapter`).

    Example:
        >>> ModelAdapter().unpack((torch.zeros(2, 3), torch.tensor([1, 0]), "extra"))[1]
        tensor([1, 0])
    """

    loss_fn: LossFn | None = None
    input_key: str | None = None
    target_key: str | None = None
    forward_fn: ForwardFn | None = None
    embed_fn: ForwardFn | None = None
    forward_embedded_fn: ForwardFn | None = None
    loss_source: str = "given"

    def unpack(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` of a batch: ``(x, y, *rest)`` or a dict with the usual keys.

        Raises:
            TypeError: For any other batch, naming ``adapter=``.
        """
        if isinstance(batch, Mapping):
            return self._lookup(batch, self.input_key, INPUT_KEYS, "input"), self._lookup(
                batch, self.target_key, TARGET_KEYS, "target"
            )
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise TypeError(
            "Expected a held-out batch of the form (inputs, targets, ...) or a dict with input "
            f"keys {list(INPUT_KEYS)} and target keys {list(TARGET_KEYS)}, but got "
            f"{_describe_batch(batch)}. Pass adapter=ModelAdapter(input_key=..., target_key=...) "
            "or a ModelAdapter subclass whose unpack() splits your batch."
        )

    @staticmethod
    def _lookup(batch: Mapping[str, Any], key: str | None, keys: Sequence[str], what: str) -> Any:
        candidates = [key] if key is not None else list(keys)
        for name in candidates:
            if name in batch:
                return batch[name]
        option = f"{what}_key"
        raise TypeError(
            f"Expected the dict batch to hold its {what}s under one of {candidates}, but its keys "
            f"are {sorted(map(str, batch))}. Pass adapter=ModelAdapter({option}='...')."
        )

    def forward(self, module: nn.Module, inputs: Tensor) -> Any:
        """The module's outputs on ``inputs`` (``.logits`` of a Hugging Face-style output)."""
        outputs = self.forward_fn(module, inputs) if self.forward_fn else module(inputs)
        return _logits(outputs)

    def loss(self, outputs: Any, targets: Tensor) -> Tensor:
        """The training loss of ``outputs`` against ``targets`` (a scalar)."""
        loss_fn = self.loss_fn if self.loss_fn is not None else F.cross_entropy
        return loss_fn(outputs, targets)

    @property
    def embeds(self) -> bool:
        """Whether token ids can be mapped to continuous embeddings (``embed_fn`` is given)."""
        return self.embed_fn is not None and self.forward_embedded_fn is not None

    def embed(self, module: nn.Module, inputs: Tensor) -> Tensor:
        """The continuous embeddings of token ids (``embed_fn``).

        Raises:
            TypeError: Without ``embed_fn``/``forward_embedded_fn``.
        """
        if self.embed_fn is None or self.forward_embedded_fn is None:
            raise TypeError(
                f"Expected continuous inputs, but the held-out inputs are {inputs.dtype} token ids "
                "and the adapter cannot embed them. Pass adapter=ModelAdapter(embed_fn=..., "
                "forward_embedded_fn=...), e.g. lightning_privacy.adapters.token_model("
                "'token_embedding') for a model that looks tokens up in one nn.Embedding."
            )
        return self.embed_fn(module, inputs)

    def forward_embedded(self, module: nn.Module, embedded: Tensor) -> Any:
        """The outputs of the model from the embeddings on (``forward_embedded_fn``)."""
        if self.forward_embedded_fn is None:
            raise TypeError("Expected ModelAdapter(forward_embedded_fn=...) with embed_fn.")
        return _logits(self.forward_embedded_fn(module, embedded))


def _logits(outputs: Any) -> Any:
    """``outputs.logits`` / ``outputs["logits"]`` of a Hugging Face-style output, else as is."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    return getattr(outputs, "logits", outputs)


def _describe_batch(batch: Any) -> str:
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return f"a {type(batch).__name__} of {len(batch)} element(s)"
    if isinstance(batch, Tensor):
        return f"a single tensor of shape {tuple(batch.shape)}"
    return type(batch).__name__


def resolve_adapter(module: nn.Module, adapter: ModelAdapter | None) -> ModelAdapter:
    """The adapter an observer uses: ``adapter``, else ``module.privacy_adapter``, else the default.

    When the adapter gives no ``loss_fn``, it is the module's ``loss_fn`` (or ``criterion``)
    attribute if callable, else mean cross-entropy; ``loss_source`` says which.

    Raises:
        TypeError: If ``adapter`` or ``module.privacy_adapter`` is not a :class:`ModelAdapter`.

    Example:
        >>> resolve_adapter(torch.nn.Linear(2, 2), None).loss_source
        'default cross-entropy'
    """
    chosen = adapter if adapter is not None else getattr(module, "privacy_adapter", None)
    chosen = ModelAdapter() if chosen is None else chosen
    if not isinstance(chosen, ModelAdapter):
        raise TypeError(
            "Expected `adapter` (or the module's `privacy_adapter` attribute) to be a "
            f"lightning_privacy.ModelAdapter, but got {type(chosen).__name__}."
        )
    if chosen.loss_fn is not None:
        return chosen
    for attribute in ("loss_fn", "criterion"):
        found = getattr(module, attribute, None)
        if callable(found):
            return replace(chosen, loss_fn=found, loss_source=f"module.{attribute}")
    return replace(chosen, loss_fn=F.cross_entropy, loss_source="default cross-entropy")


class AdaptedModel(nn.Module):
    """A module seen through an adapter: ``forward(x)`` is the adapter's, parameter names the same.

    The wrapper shares the module's parameter, buffer and submodule tables (it does not own the
    module as a child), so ``named_parameters()`` gives the module's own names -- the names
    ``GradientDefense(layers=)`` selects -- and ``torch.func.functional_call`` on the wrapper
    swaps the module's tensors. ``embedded=True`` maps embeddings (``adapter.embed``) to outputs.

    Args:
        module: The user's module.
        adapter: How to call it (:class:`ModelAdapter`).
        embedded: Take embeddings instead of the raw inputs.

    Example:
        >>> model = AdaptedModel(torch.nn.Linear(2, 3), ModelAdapter())
        >>> model(torch.zeros(1, 2)).shape
        torch.Size([1, 3])
    """

    wrapped: nn.Module
    adapter: ModelAdapter
    embedded: bool

    def __init__(self, module: nn.Module, adapter: ModelAdapter, *, embedded: bool = False) -> None:
        super().__init__()
        self._parameters = module._parameters
        self._buffers = module._buffers
        self._modules = module._modules
        self._non_persistent_buffers_set = module._non_persistent_buffers_set
        object.__setattr__(self, "wrapped", module)
        object.__setattr__(self, "adapter", adapter)
        object.__setattr__(self, "embedded", embedded)
        self.training = module.training

    def forward(self, inputs: Tensor) -> Any:
        """The adapter's forward (or forward from the embeddings) of the wrapped module."""
        if self.embedded:
            return self.adapter.forward_embedded(self.wrapped, inputs)
        return self.adapter.forward(self.wrapped, inputs)

    def train(self, mode: bool = True) -> AdaptedModel:
        """Set the wrapped module's mode (the wrapper follows)."""
        self.wrapped.train(mode)
        self.training = mode
        return self


def token_model(embedding: str) -> ModelAdapter:
    """An adapter for a model that looks its tokens up in one ``nn.Embedding`` (a recipe).

    ``embed`` is that lookup; ``forward_embedded`` runs the model's own forward with the lookup
    answered by the given embeddings (the embedding module's output is replaced by a forward hook),
    so nothing of the model's forward is re-implemented.

    Args:
        embedding: The dotted name of the embedding submodule (``"token_embedding"``,
            ``"model.embedding"``, ``"bert.embeddings.word_embeddings"``, ...).

    Example:
        >>> from lightning_privacy.models import TinyTransformerLM
        >>> lm = TinyTransformerLM(vocab_size=20, d_model=8, n_layers=1, n_heads=2, max_len=4)
        >>> adapter = token_model("token_embedding")
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> e = adapter.embed(lm, tokens)
        >>> torch.allclose(adapter.forward_embedded(lm, e), lm(tokens))
        True
    """
    return ModelAdapter(
        embed_fn=lambda module, ids: module.get_submodule(embedding)(ids),
        forward_embedded_fn=lambda module, embedded: _forward_with_embeddings(
            module, embedding, embedded, lambda m, ids: m(ids)
        ),
    )


def _forward_with_embeddings(
    module: nn.Module, embedding: str, embedded: Tensor, call: ForwardFn
) -> Any:
    """``call(module, ids)`` where every lookup in ``embedding`` returns part of ``embedded``.

    ``ids`` are placeholders whose value is the position they stand for: a lookup of any slice
    of them returns the matching slice of ``embedded``, in any number of calls. The lookup itself
    runs on the placeholders clamped into the vocabulary and its result is discarded.
    """
    layer = module.get_submodule(embedding)
    flat = embedded.reshape(-1, embedded.shape[-1])
    positions = torch.arange(flat.shape[0], device=embedded.device).reshape(embedded.shape[:-1])
    size = getattr(layer, "num_embeddings", None)
    looked_up: list[Tensor] = []

    def before(_layer: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        looked_up.append(args[0])
        return None if size is None else (args[0].clamp(max=size - 1), *args[1:])

    def after(_layer: nn.Module, _args: Any, _output: Any) -> Tensor:
        return flat[looked_up.pop()]

    handles = [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    try:
        return call(module, positions)
    finally:
        for handle in handles:
            handle.remove()


def lightning_demo_transformer() -> ModelAdapter:
    """The recipe for Lightning's demo ``LightningTransformer`` (``forward(inputs, target)``).

    Its batches are ``(inputs, target)`` token ids and ``target`` feeds the decoder too, so the
    adapter stacks both into the inputs an attacker reconstructs, ``(B, 2, T)``; the loss is the
    demo's ``nll_loss(output, target.view(-1))``; embeddings come from ``model.embedding``.

    Example:
        >>> from lightning.pytorch.demos import LightningTransformer
        >>> module = LightningTransformer(vocab_size=30)
        >>> tokens = torch.randint(0, 30, (2, 5))
        >>> adapter = lightning_demo_transformer()
        >>> inputs, targets = adapter.unpack((tokens, tokens))
        >>> tuple(inputs.shape), adapter.loss(adapter.forward(module, inputs), targets).ndim
        ((2, 2, 5), 0)
    """
    return _DemoTransformerAdapter(
        loss_fn=lambda outputs, target: F.nll_loss(outputs, target.reshape(-1)),
        embed_fn=lambda module, ids: module.get_submodule("model.embedding")(ids),
        forward_embedded_fn=lambda module, embedded: _forward_with_embeddings(
            module, "model.embedding", embedded, lambda m, ids: m(ids[:, 0], ids[:, 1])
        ),
    )


@dataclass(frozen=True)
class _DemoTransformerAdapter(ModelAdapter):
    """:func:`lightning_demo_transformer`'s batch and call conventions."""

    def unpack(self, batch: Any) -> tuple[Tensor, Tensor]:
        inputs, target = super().unpack(batch)
        return torch.stack([inputs, target], dim=1), target

    def forward(self, module: nn.Module, inputs: Tensor) -> Any:
        return module(inputs[:, 0], inputs[:, 1])


def check_adapter(
    module: nn.Module,
    adapter: ModelAdapter,
    inputs: Tensor,
    targets: Tensor,
    *,
    continuous: bool,
) -> list[str]:
    """Every reason the observers cannot replay the training loss on ``(inputs, targets)``.

    Runs one forward, loss and gradient through the adapter (call it in eval mode, with the RNG
    forked, as the observers do); with ``continuous`` also the gradient of the parameter gradient
    with respect to the (embedded) inputs, which attacks and the I²F differentiate.

    Returns:
        One line per problem, each naming what to change (empty: the observers can run).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4 * 6 * 6, 10))
        >>> check_adapter(net, ModelAdapter(), torch.rand(2, 1, 8, 8), torch.tensor([0, 1]),
        ...               continuous=True)[0][:60]
        'the held-out inputs have 1 channel(s), but the first convolu'
        >>> check_adapter(net, ModelAdapter(), torch.rand(2, 3, 8, 8), torch.tensor([0, 12]),
        ...               continuous=True)[0][:57]
        'the held-out targets hold class ids in [0, 12], but the m'
    """
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        return [
            "the adapter's unpack() must return (inputs, targets) tensors, but it returned "
            f"({type(inputs).__name__}, {type(targets).__name__})"
        ]
    model_inputs = inputs
    forward: Callable[[nn.Module, Tensor], Any] = adapter.forward
    if not inputs.is_floating_point() and continuous:
        if not adapter.embeds:
            return [
                f"the held-out inputs are {inputs.dtype} token ids, which have no gradient: pass "
                "adapter=ModelAdapter(embed_fn=..., forward_embedded_fn=...) (a recipe: "
                "lightning_privacy.adapters.token_model('<name of the nn.Embedding>'))"
            ]
        model_inputs, forward = adapter.embed(module, inputs).detach(), adapter.forward_embedded
    if continuous:
        model_inputs = model_inputs.detach().requires_grad_(True)
    try:
        outputs = forward(module, model_inputs)
    except (TypeError, RuntimeError, ValueError, IndexError) as err:
        return [_forward_problem(module, inputs, err)]
    problems = _label_problems(outputs, targets)
    return problems or _gradient_problems(
        module, adapter, outputs, targets, model_inputs, continuous
    )


def _forward_problem(module: nn.Module, inputs: Tensor, err: Exception) -> str:
    """What a failed forward of the held-out inputs means, and the fix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, TypeError) and "positional argument" in text:
        return (
            f"the module's forward needs more than the held-out inputs ({text}): pass "
            "adapter=ModelAdapter(forward_fn=lambda module, x: module(x, ...))"
        )
    conv = next((m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is not None and inputs.ndim >= 2 and inputs.shape[1] != conv.in_channels:
        name = next(n for n, m in module.named_modules() if m is conv)
        return (
            f"the held-out inputs have {inputs.shape[1]} channel(s), but the first convolution "
            f"{name!r} expects {conv.in_channels}: give the observers inputs shaped like the "
            "training inputs (`batch=` or the validation data)"
        )
    return (
        f"the model rejects held-out inputs of shape {tuple(inputs.shape)} and dtype "
        f"{inputs.dtype} ({type(err).__name__}: {text}); is the image size or the batch format "
        "that of the training data? Pass `batch=` or a ModelAdapter for other formats"
    )


def _label_problems(outputs: Any, targets: Tensor) -> list[str]:
    """Class ids outside the logits' range (for ``(B, C)`` logits and integer targets)."""
    if not isinstance(outputs, Tensor) or outputs.ndim != 2 or targets.is_floating_point():
        return []
    if targets.ndim != 1 or targets.numel() == 0:
        return []
    low, high = int(targets.min()), int(targets.max())
    if low >= 0 and high < outputs.shape[1]:
        return []
    return [
        f"the held-out targets hold class ids in [{low}, {high}], but the model outputs "
        f"{outputs.shape[1]} logits per example (ids must lie in [0, {outputs.shape[1] - 1}])"
    ]


def _gradient_problems(
    module: nn.Module,
    adapter: ModelAdapter,
    outputs: Any,
    targets: Tensor,
    inputs: Tensor,
    continuous: bool,
) -> list[str]:
    """A loss that is no scalar, has no path to the parameters, or no double backward."""
    try:
        loss = adapter.loss(outputs, targets)
    except (TypeError, RuntimeError, ValueError, IndexError) as err:
        return [f"the adapter's loss fails on the module's outputs ({type(err).__name__}: {err})"]
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        return [
            f"the loss must be a scalar (the reduction of training_step), but it has shape "
            f"{shape}: pass ModelAdapter(loss_fn=...) that reduces as training_step does"
        ]
    params = [p for p in module.parameters() if p.requires_grad]
    if not loss.requires_grad or not params:
        return ["the loss has no path to the module's trainable parameters"]
    grads = torch.autograd.grad(loss, params, allow_unused=True, create_graph=continuous)
    if all(g is None for g in grads):
        return ["the loss has no path to the module's trainable parameters"]
    if not continuous:
        return []
    second = sum((g.square().sum() for g in grads if g is not None), torch.zeros(()))
    try:
        torch.autograd.grad(second, inputs, allow_unused=True)
    except (RuntimeError, NotImplementedError) as err:
        return [
            "the model has an operation without a double backward, which attacks and the I2F "
            f"need ({str(err).splitlines()[0]}); replace it, or run its layer differently "
            "(e.g. timm: fused_attn=False)"
        ]
    return []
