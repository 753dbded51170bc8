"""Which layers of a module Opacus can train with DP-SGD, and the fixes it knows.

Pure checks on an ``nn.Module`` (no Lightning, no Trainer): the ``DPSGD`` callback calls them in
``setup`` and reports every problem in one error, before anything is built.

Example:
    >>> from torch import nn
    >>> find_unsupported_layers(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4)))
    []
"""

from __future__ import annotations

from torch import nn

__all__ = ["find_unsupported_layers", "fix_unsupported_layers"]


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
    problems = []
    for name, sub in module.named_modules():
        if any(p.requires_grad for p in sub.parameters(recurse=False)):
            problem = _layer_problem(sub)
            if problem is not None:
                problems.append(f"{name!r} ({type(sub).__name__}): {problem}")
    return problems


def _layer_problem(layer: nn.Module) -> str | None:
    """Why Opacus cannot give per-sample gradients for one trainable layer (``None``: it can)."""
    from opacus.validators.module_validator import ModuleValidator

    validator = ModuleValidator.VALIDATORS.get(type(layer))
    if validator is not None:
        errors = validator(layer)
        if not errors:
            return None
        fixable = ModuleValidator.FIXERS.get(type(layer)) is not None
        how = " [fixable: fix_model=True]" if fixable else ""
        return "; ".join(str(e) for e in errors) + how
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return (
            "a subclass of BatchNorm (BatchNorm mixes examples, so per-sample gradients do not "
            "exist); Opacus's exact-type check misses it and fix_model cannot rebuild it -- build "
            "the model with GroupNorm/LayerNorm (timm: norm_layer=...), or freeze it "
            "(requires_grad_(False) and eval())"
        )
    if list(layer.buffers(recurse=False)):
        return (
            "a trainable layer with buffers, which Opacus cannot compute per-sample gradients "
            "for -- replace it or freeze its parameters"
        )
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
