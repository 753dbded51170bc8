"""Which layers of a module Opacus can train with DP-SGD, and the fixes it knows.

Pure checks on an ``nn.Module`` (no Lightning, no Trainer): the ``DPSGD`` callback calls them in
``setup`` and reports every problem in one error, before anything is built. A model has many layers
of one type with one problem (ResNet-18: 20 BatchNorm2d), so the report groups them
(:func:`group_layer_problems`): one line per type and problem, its count and first names.

Example:
    >>> from torch import nn
    >>> find_unsupported_layers(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4)))
    []
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

__all__ = [
    "LayerProblem",
    "find_unsupported_layers",
    "fix_unsupported_layers",
    "group_layer_problems",
    "layer_problems",
    "name_list",
]

#: Names :func:`name_list` shows before it says how many more there are.
SHOWN_NAMES = 3


@dataclass(frozen=True)
class LayerProblem:
    """One trainable layer Opacus cannot give per-sample gradients for.

    Attributes:
        name: The layer's qualified name in the module (``"net.bn1"``).
        layer_type: Its class name (``"BatchNorm2d"``).
        problem: Why, and what to do about it.
        fixable: Whether ``fix_model=True`` (Opacus's ``ModuleValidator`` fixers) replaces it.

    Example:
        >>> print(LayerProblem("net.bn1", "BatchNorm2d", "mixes examples", fixable=True))
        'net.bn1' (BatchNorm2d): mixes examples [fixable: fix_model=True]
    """

    name: str
    layer_type: str
    problem: str
    fixable: bool

    def __str__(self) -> str:
        how = " [fixable: fix_model=True]" if self.fixable else ""
        return f"{self.name!r} ({self.layer_type}): {self.problem}{how}"


def name_list(names: Sequence[str], shown: int = SHOWN_NAMES) -> str:
    """The first ``shown`` names quoted, then how many more there are.

    Example:
        >>> name_list(["a", "b"]), name_list(["a", "b", "c", "d", "e"])
        ("'a', 'b'", "'a', 'b', 'c', … 2 more")
    """
    text = ", ".join(repr(n) for n in names[:shown])
    return text if len(names) <= shown else f"{text}, … {len(names) - shown} more"


def group_layer_problems(problems: Sequence[LayerProblem]) -> list[str]:
    """One line per layer type and problem: ``count x type (first names …): problem [fix]``.

    A type with one layer keeps the per-layer line of :func:`find_unsupported_layers`; the problem
    text (Opacus's BatchNorm paragraph is 700 characters) appears once per group. Groups keep the
    order of their first layer.

    Example:
        >>> bn = [LayerProblem(f"bn{i}", "BatchNorm2d", "mixes examples", True) for i in range(5)]
        >>> for line in group_layer_problems([*bn, LayerProblem("x", "MyBN", "subclass", False)]):
        ...     print(line)
        5 x BatchNorm2d ('bn0', 'bn1', 'bn2', … 2 more): mixes examples [fixable: fix_model=True]
        'x' (MyBN): subclass
    """
    groups: dict[tuple[str, str, bool], list[LayerProblem]] = {}
    for problem in problems:
        key = (problem.layer_type, problem.problem, problem.fixable)
        groups.setdefault(key, []).append(problem)
    lines = []
    for (layer_type, _, _), members in groups.items():
        if len(members) == 1:
            lines.append(str(members[0]))
            continue
        first = members[0]
        how = " [fixable: fix_model=True]" if first.fixable else ""
        names = name_list([m.name for m in members])
        lines.append(f"{len(members)} x {layer_type} ({names}): {first.problem}{how}")
    return lines


def find_unsupported_layers(module: nn.Module) -> list[str]:
    """Every layer of ``module`` Opacus cannot train with DP-SGD, one line each with its fix.

    Runs Opacus's ``ModuleValidator`` per trainable submodule and also flags trainable
    subclasses of ``_BatchNorm`` and trainable layers with buffers, which Opacus's exact-type
    validators miss (timm's ``BatchNormAct2d`` is one).

    Example:
        >>> class MyBN(nn.BatchNorm2d):
        ...     pass
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), MyBN(4))
        >>> for line in find_unsupported_layers(net):
        ...     print(line.split(":")[0])
        '1' (BatchNorm2d)
        '2' (MyBN)
    """
    return [str(problem) for problem in layer_problems(module)]


def layer_problems(module: nn.Module) -> list[LayerProblem]:
    """What :func:`find_unsupported_layers` reports, as :class:`LayerProblem` records.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> [(p.name, p.layer_type, p.fixable) for p in layer_problems(net)]
        [('1', 'BatchNorm2d', True)]
    """
    problems = []
    for name, sub in module.named_modules():
        if any(p.requires_grad for p in sub.parameters(recurse=False)):
            found = _layer_problem(sub)
            if found is not None:
                problems.append(LayerProblem(name, type(sub).__name__, *found))
    return problems


def _layer_problem(layer: nn.Module) -> tuple[str, bool] | None:
    """Why Opacus cannot give per-sample gradients for one trainable layer, and if it is fixable.

    ``None``: it can.
    """
    from opacus.validators.module_validator import ModuleValidator

    validator = ModuleValidator.VALIDATORS.get(type(layer))
    if validator is not None:
        errors = validator(layer)
        if not errors:
            return None
        fixable = ModuleValidator.FIXERS.get(type(layer)) is not None
        return "; ".join(str(e) for e in errors), fixable
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return (
            "a subclass of BatchNorm (BatchNorm mixes examples, so per-sample gradients do not "
            "exist); Opacus's exact-type check misses it and fix_model cannot rebuild it -- build "
            "the model with GroupNorm/LayerNorm (timm: norm_layer=...), or freeze it "
            "(requires_grad_(False) and eval())"
        ), False
    if list(layer.buffers(recurse=False)):
        return (
            "a trainable layer with buffers, which Opacus cannot compute per-sample gradients "
            "for -- replace it or freeze its parameters"
        ), False
    return None


def fix_unsupported_layers(module: nn.Module) -> list[str]:
    """Replace, in place, every layer Opacus's ``ModuleValidator`` knows how to fix.

    BatchNorm becomes ``GroupNorm(gcd(32, C), C)``, LSTM/GRU/MultiheadAttention their DP
    versions, InstanceNorm stops tracking running stats. Returns the replaced names.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> fix_unsupported_layers(net), type(net[1]).__name__
        (['1'], 'GroupNorm')
    """
    from opacus.validators.module_validator import ModuleValidator

    replaced = []
    for name, sub in list(module.named_modules()):
        fixer = ModuleValidator.FIXERS.get(type(sub))
        if not name or fixer is None or not any(p.requires_grad for p in sub.parameters(False)):
            continue
        if not ModuleValidator.VALIDATORS.get(type(sub), lambda m: [])(sub):
            continue
        new = fixer(sub)
        first = next(sub.parameters(), None)
        if first is not None:
            new = new.to(first.device)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        parent._modules[child] = new
        replaced.append(name)
    return replaced
