"""Which modules modify, in place, a tensor that Opacus's backward hooks wrap.

Opacus (1.6, every ``grad_sample_mode``: hooks, functorch and ghost alike) registers
``register_full_backward_hook`` on each layer with trainable parameters of its own. PyTorch then
passes that layer's inputs and outputs through ``BackwardHookFunction``, a custom autograd
function that returns them as views; modifying such a view in place is forbidden ("Output 0 of
BackwardHookFunction is a view and is being modified inplace", pytorch/pytorch#61519). Every
in-place op on a hooked layer's output (or a view of it) raises, in the forward pass: ``out +=
identity`` in torchvision's ``BasicBlock``, ``nn.ReLU(inplace=True)`` (and every other
``inplace=True`` activation or dropout) after a conv or norm layer, ``x[:, 0] = 0``, ``x.add_(1)``.
An op on a fresh tensor (``out = out + identity``, ``out.clone().add_(1)``) is fine.

:func:`find_inplace_writes` finds them all before training: it runs one training step (the
caller's ``step``) on a deep copy of the module with Opacus's hooks attached, watches every torch
call with a ``TorchFunctionMode``, and when one raises that error it records the module whose
forward was running, the source line, and which hooked layer's output it was, then retries the
op on a clone so that the forward pass goes on and finds the others. The user's module, its
parameters, buffers (BatchNorm statistics) and ``.grad`` are not touched (the copy shares only
the frozen parameters, which nothing writes), and the global random streams (torch CPU and CUDA,
Python's, NumPy's) are restored afterwards.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    >>> writes = find_inplace_writes(net, lambda copy: copy(torch.ones(2, 3)).sum())
    >>> [(w.name, w.module_type, w.operation, w.producer, w.fixable) for w in writes]
    [('1', 'ReLU', 'ReLU(inplace=True)', "'0' (Linear)", True)]
    >>> turn_off_inplace(net, [w.name for w in writes]), net[1].inplace
    (['1'], False)
    >>> find_inplace_writes(net, lambda copy: copy(torch.ones(2, 3)).sum())
    []
"""

from __future__ import annotations

import contextlib
import copy
import gc
import linecache
import os
import random
import re
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from types import FrameType, TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_privacy.engines.opacus_layers import name_list

__all__ = ["InplaceWrite", "find_inplace_writes", "inplace_report", "turn_off_inplace"]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)
_TORCHVISION = "torchvision/models/"
_AUGMENTED = re.compile(r"^(?P<target>[\w.\[\]]+)\s*(?P<op>[-+*/@%&|^]|//|\*\*)=\s*(?P<rhs>.+)$")


@dataclass(frozen=True)
class InplaceWrite:
    """One module that modifies, in place, a tensor Opacus's backward hooks wrap.

    Attributes:
        name: The module whose forward ran the in-place op (``"net.layer1.0"``; ``""`` for
            the root, e.g. the op was in ``training_step``).
        module_type: Its class name (``"BasicBlock"``).
        operation: The op: the source line (``"out += identity"``), or ``"ReLU(inplace=True)"``
            for a module whose own ``inplace`` attribute is true.
        location: ``"path/to/file.py:102"`` of the source line (``""`` if unknown).
        producer: Whose output was modified (``"'net.layer1.0.bn2' (GroupNorm)"``), or
            ``"a hooked layer's output"`` if unknown.
        fixable: The module has ``inplace=True``, which :func:`turn_off_inplace` (and
            ``DPSGD(fix_model=True)``) turns off.
        in_library: The source line is in an installed package (torchvision, timm), so the user
            cannot edit it but can subclass the module.

    Example:
        >>> w = InplaceWrite("net.relu", "ReLU", "ReLU(inplace=True)", "", "'net.bn1' (GroupNorm)",
        ...                  fixable=True)
        >>> w.label
        "'net.relu' (ReLU)"
    """

    name: str
    module_type: str
    operation: str
    location: str
    producer: str
    fixable: bool
    in_library: bool = False

    @property
    def label(self) -> str:
        """``'name' (Type)``, the way the other DPSGD messages name a module."""
        return f"{self.name!r} ({self.module_type})"


def find_inplace_writes(
    module: nn.Module,
    step: Callable[[nn.Module], Any],
    *,
    grad_sample_mode: str = "hooks",
    max_grad_norm: float = 1.0,
) -> list[InplaceWrite]:
    """Every module of ``module`` whose forward modifies a hook-wrapped tensor in place.

    ``step(copy)`` runs one training step's forward on a deep copy of ``module`` carrying
    Opacus's hooks for ``grad_sample_mode``, and returns the loss (a scalar, per-sample losses,
    or ``None``); the loss is then back-propagated on the copy, so Opacus's per-sample-gradient
    hooks run once too. One entry per module and op, in the order they ran.

    Raises:
        Exception: Whatever ``step``, the copy or the backward pass raises other than the
            in-place error (the caller decides whether that matters).
    """
    frozen = {id(p): p for p in module.parameters() if not p.requires_grad}
    with _isolated_random_state(module), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rehearsal = copy.deepcopy(module, memo=dict(frozen))
        alive = weakref.ref(rehearsal)
        try:
            return _rehearse(rehearsal, step, grad_sample_mode, max_grad_norm)
        finally:
            del rehearsal
            if alive() is not None:  # functorch's per-layer closures hold it in a cycle
                gc.collect()


def _rehearse(
    rehearsal: nn.Module, step: Callable[[nn.Module], Any], mode: str, max_grad_norm: float
) -> list[InplaceWrite]:
    """Opacus's hooks on the copy, the forward under the recorder, then the backward."""
    from opacus.grad_sample.utils import prepare_module

    extra = {"max_grad_norm": max_grad_norm} if mode == "ghost" else {}
    hooks = prepare_module(
        rehearsal,
        grad_sample_mode=mode,
        wrap_model=False,
        batch_first=True,
        loss_reduction="mean",
        **extra,
    )
    recorder = _Recorder(rehearsal)
    try:
        with recorder:
            loss = recorder.run(step)
        if isinstance(loss, Tensor) and loss.requires_grad and not recorder.stopped:
            (loss if loss.ndim == 0 else loss.mean()).backward()
    finally:
        recorder.remove()
        hooks.cleanup()
    return list(recorder.writes.values())


def turn_off_inplace(module: nn.Module, names: Sequence[str]) -> list[str]:
    """Set ``inplace = False`` on the named submodules that have ``inplace=True``.

    Returns the names changed (an ``inplace`` activation computes the same values out of place,
    with one more activation tensor).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True), nn.ReLU())
        >>> turn_off_inplace(net, ["1", "2"]), net[1].inplace
        (['1'], False)
    """
    changed = []
    for name in names:
        sub = module.get_submodule(name)
        if getattr(sub, "inplace", None) is True:
            sub.inplace = False  # type: ignore[assignment]
            changed.append(name)
    return changed


def inplace_report(
    writes: Sequence[InplaceWrite], *, fix_model: bool, fixed: Sequence[str] = ()
) -> str:
    """One error message for ``writes``: grouped by module type and op, each with its remedy.

    ``fixed``: the modules ``fix_model=True`` already set ``inplace=False`` on (said once).

    Example:
        >>> w = [InplaceWrite(f"net.layer{i}", "BasicBlock", "out += identity", "resnet.py:102",
        ...                   f"'net.layer{i}.bn2' (GroupNorm)", False, True) for i in range(4)]
        >>> print(inplace_report(w, fix_model=True))  # doctest: +NORMALIZE_WHITESPACE
        DPSGD: 4 module(s) modify in place the output of a layer Opacus hooks for per-sample
        gradients, which PyTorch forbids under Opacus's backward hooks ("Output 0 of
        BackwardHookFunction is a view and is being modified inplace"); the first training step
        would fail. Found on a copy of the model before the first step; nothing was trained:
          - 4 x BasicBlock ('net.layer0', 'net.layer1', 'net.layer2', … 1 more): `out +=
        identity` (resnet.py:102) modifies the output of 'net.layer0.bn2' (GroupNorm) in place --
        write it out of place, `out = out + identity` (BasicBlock is a library's class: subclass
        it, override forward with that line, and build the model from the subclass), or
        `.clone()` the hooked layer's output before modifying it
    """
    groups: dict[tuple[str, str, str], list[InplaceWrite]] = {}
    for write in writes:
        groups.setdefault((write.module_type, write.operation, write.location), []).append(write)
    lines = []
    for members in groups.values():
        first = members[0]
        who = (
            first.label
            if len(members) == 1
            else f"{len(members)} x {first.module_type} ({name_list([m.name for m in members])})"
        )
        where = f" ({first.location})" if first.location else ""
        lines.append(
            f"{who}: `{first.operation}`{where} modifies the output of {first.producer} in place "
            f"-- {_remedy(first, fix_model=fix_model)}"
        )
    done = (
        f"\nDPSGD(fix_model=True) set inplace=False on {len(fixed)} other module(s): "
        f"{name_list(fixed)}."
        if fixed
        else ""
    )
    modules = len({w.name for w in writes})
    return (
        f"DPSGD: {modules} module(s) modify in place the output of a layer Opacus hooks for "
        "per-sample gradients, which PyTorch forbids under Opacus's backward hooks (\"Output 0 "
        'of BackwardHookFunction is a view and is being modified inplace"); the first training '
        "step would fail. Found on a copy of the model before the first step; nothing was "
        "trained:\n  - " + "\n  - ".join(lines) + done
    )


def _remedy(write: InplaceWrite, *, fix_model: bool) -> str:
    """What the user changes for one kind of in-place write."""
    if write.fixable:
        if fix_model:
            return (
                "fix_model=True set inplace=False on it, but it still runs in place (its forward "
                "does not read `self.inplace`); replace it with an out-of-place module"
            )
        return "construct it with inplace=False, or pass DPSGD(fix_model=True), which turns it off"
    match = _AUGMENTED.match(write.operation)
    rewrite = (
        f"`{match['target']} = {match['target']} {match['op']} {match['rhs']}`"
        if match
        else "the op without the trailing underscore, e.g. `x = x.add(y)` for `x.add_(y)`"
    )
    library = ""
    if write.in_library:
        docs = "; DPSGD's docs show it for ResNet" if _TORCHVISION in write.location else ""
        library = (
            f" ({write.module_type} is a library's class: subclass it, override forward with "
            f"that line, and build the model from the subclass{docs})"
        )
    return (
        f"write it out of place, {rewrite}{library}, or `.clone()` the hooked layer's output "
        "before modifying it"
    )


class _Recorder(TorchFunctionMode):
    """Track the running module and record every in-place write Opacus's hooks forbid."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.root = module
        self.stack: list[tuple[str, nn.Module]] = []
        self.outputs: dict[int, tuple[Tensor, str]] = {}
        self.writes: dict[tuple[str, str], InplaceWrite] = {}
        self.stopped = False
        self.handles: list[RemovableHandle] = []
        for name, sub in module.named_modules():
            self.handles.append(sub.register_forward_pre_hook(partial(self._enter, name)))
            self.handles.append(sub.register_forward_hook(partial(self._leave, name)))

    def _enter(self, name: str, sub: nn.Module, args: Any) -> None:
        self.stack.append((name, sub))

    def _leave(self, name: str, sub: nn.Module, args: Any, output: Any) -> None:
        if self.stack and self.stack[-1][0] == name:
            self.stack.pop()
        if any(p.requires_grad for p in sub.parameters(recurse=False)):
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            for out in outputs:
                if isinstance(out, Tensor):
                    self.outputs[id(out)] = (out, f"{name!r} ({type(sub).__name__})")

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.outputs, self.stack = [], {}, []
        self.root = nn.Module()  # drop the copy

    def run(self, step: Callable[[nn.Module], Any]) -> Any:
        """``step(root)``; an in-place error the mode did not see ends it, recorded."""
        try:
            return step(self.root)
        except RuntimeError as err:
            if not _is_hook_view_error(err):
                raise
            self.stopped = True
            self._record(None, _user_frame_in(err.__traceback__))
            return None

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        try:
            return func(*args, **kwargs)
        except RuntimeError as err:
            target, retry = _on_clone(args, kwargs)
            if target is None or not _is_hook_view_error(err):
                raise
            self._record(target, _user_frame(sys._getframe(1)))
            return func(*retry[0], **retry[1])

    def _record(self, target: Tensor | None, frame: tuple[str, str, bool]) -> None:
        name, sub = self.stack[-1] if self.stack else ("", self.root)
        kind = type(sub).__name__
        base = None if target is None else (target._base if target._is_view() else target)
        producer = self.outputs.get(id(base), (None, "a hooked layer's output"))[1]
        if getattr(sub, "inplace", None) is True:  # its own flag: the call site does not matter
            write = InplaceWrite(name, kind, f"{kind}(inplace=True)", "", producer, True)
        else:
            write = InplaceWrite(name, kind, frame[1], frame[0], producer, False, frame[2])
        self.writes.setdefault((name, write.operation), write)


def _is_hook_view_error(err: BaseException) -> bool:
    text = str(err)
    return "is a view and is being modified inplace" in text and "custom Function" in text


def _on_clone(
    args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[Tensor | None, tuple[tuple[Any, ...], dict[str, Any]]]:
    """The tensor an in-place op writes (its first argument) and the arguments with it cloned."""
    if args and isinstance(args[0], Tensor):
        return args[0], ((args[0].clone(), *args[1:]), kwargs)
    target = kwargs.get("input")
    if isinstance(target, Tensor):
        return target, (tuple(args), {**kwargs, "input": target.clone()})
    return None, ((), {})


def _user_frame(frame: FrameType | None) -> tuple[str, str, bool]:
    """``("file:line", source, in a package)`` of the innermost frame outside torch and here."""
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH_DIR) and os.path.abspath(path) != _THIS_FILE:
            return _frame_text(path, frame.f_lineno)
        frame = frame.f_back
    return "", "an in-place op", False


def _user_frame_in(tb: TracebackType | None) -> tuple[str, str, bool]:
    """:func:`_user_frame` for the innermost frame of a traceback."""
    found = "", "an in-place op", False
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename
        if not path.startswith(_TORCH_DIR) and os.path.abspath(path) != _THIS_FILE:
            found = _frame_text(path, tb.tb_lineno)
        tb = tb.tb_next
    return found


def _frame_text(path: str, line: int) -> tuple[str, str, bool]:
    source = linecache.getline(path, line).strip() or "an in-place op"
    parts = re.split(r"/(?:site|dist)-packages/", path.replace(os.sep, "/"))
    return f"{parts[-1]}:{line}", source, len(parts) > 1


@contextlib.contextmanager
def _isolated_random_state(module: nn.Module) -> Iterator[None]:
    """Fork torch's CPU and CUDA generators and restore Python's and NumPy's streams."""
    devices = sorted(
        {t.device.index or 0 for t in [*module.parameters(), *module.buffers()] if t.is_cuda}
    )
    if torch.cuda.is_available():
        devices = sorted({*devices, torch.cuda.current_device()})
    python_state = random.getstate()
    numpy_random = getattr(sys.modules.get("numpy"), "random", None)
    numpy_state = numpy_random.get_state() if numpy_random is not None else None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        if numpy_random is not None:
            numpy_random.set_state(numpy_state)
