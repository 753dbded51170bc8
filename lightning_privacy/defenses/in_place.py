"""A transform pipeline applied in place to the gradients a training step is about to use.

``GradientDefense`` defends ``.grad`` tensors and DDP bucket views, which must be overwritten
rather than replaced; the transforms themselves never mutate their inputs. :class:`InPlaceDefense`
bridges the two: it runs the pipeline on the tensors, writes the result back, keeps the step's
statistics (norm before, norm of the change, zeros), handles a loss scale (fp16 gradients are
defended in true units), and hands out the generator of each random stream.

A gradient with a NaN or infinite entry is left exactly as it is (with one ``RuntimeWarning``):
clipping, noise or an SVD of it would only hide or spread the fault, and the optimizer, an AMP
loss scaler and the user's own NaN handling then see what they would see without the defense.

Example:
    >>> import torch
    >>> from lightning_privacy.defenses import GradientClipping
    >>> defense = InPlaceDefense([GradientClipping(max_norm=1.0)], seed=0)
    >>> grads = [torch.tensor([3.0, 4.0])]
    >>> defense.defend(grads, defense.generator(torch.device("cpu"), stream=0, step=0))
    >>> grads[0], defense.pop_statistics()["grad_sq"]
    (tensor([0.6000, 0.8000]), tensor(25.))
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Generator, Tensor

from lightning_privacy.defenses.base import DrawnNoise, GradientTransform, apply_transforms
from lightning_privacy.functional.defenses import global_norm
from lightning_privacy.functional.seeding import derive_seed

__all__ = ["InPlaceDefense"]


class InPlaceDefense:
    """Apply ``transforms`` to gradients in place and keep the step's statistics.

    Args:
        transforms: The pipeline, applied in order.
        seed: Seed of the random streams; may be set later (e.g. once broadcast from rank 0).

    Attributes:
        seed: The streams' seed: stream ``s`` at step ``t`` draws from
            ``derive_seed(seed, s, t)``.
    """

    def __init__(self, transforms: Sequence[GradientTransform], *, seed: int | None) -> None:
        self.transforms = tuple(transforms)
        self.seed = seed
        self._sparsifies = any(t.sparsifies for t in self.transforms)
        self._generators: dict[torch.device, Generator] = {}
        self._stats: dict[str, Tensor] = {}
        self.non_finite = 0

    def generator(self, device: torch.device, *, stream: int, step: int) -> Generator:
        """The generator of ``stream`` at ``step`` on ``device`` (re-seeded, reused)."""
        if self.seed is None:
            raise RuntimeError("InPlaceDefense.seed must be set before drawing randomness.")
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(derive_seed(self.seed, stream, step))
        return gen

    def defend(
        self,
        grads: list[Tensor],
        generator: Generator,
        *,
        scale: float = 1.0,
        noise: DrawnNoise | None = None,
    ) -> None:
        """Overwrite ``grads`` (possibly bucket views, scaled by ``scale``) with their defence.

        Tensors with a NaN or infinite entry are left unchanged (see the module's docs);
        :attr:`non_finite` counts the calls that found one.

        Args:
            grads: The tensors to defend, overwritten in place.
            generator: Source of the pipeline's randomness.
            scale: The loss scale the tensors carry (fp16 AMP); the pipeline sees ``g / scale``.
            noise: Noise drawn ahead for this step (see :class:`~.NoiseAhead`).

        Example:
            >>> import warnings
            >>> from lightning_privacy.defenses import LowRankFiltering
            >>> defense = InPlaceDefense([LowRankFiltering(rank=1)], seed=0)
            >>> grads = [torch.tensor([[1.0, float("nan")], [0.0, 1.0]])]
            >>> with warnings.catch_warnings(record=True) as caught:
            ...     warnings.simplefilter("always")
            ...     defense.defend(grads, defense.generator(torch.device("cpu"), stream=0, step=0))
            >>> grads[0], defense.non_finite, caught[0].category.__name__
            (tensor([[1., nan],
                    [0., 1.]]), 1, 'RuntimeWarning')
        """
        if not grads:
            return
        originals = grads if scale == 1.0 else [g / scale for g in grads]
        grad_sq = global_norm(originals).square()
        if not bool(torch.isfinite(grad_sq)):
            self._pass_through(grad_sq, grads)
            return
        defended = apply_transforms(self.transforms, originals, generator=generator, noise=noise)
        # The originals are overwritten below, so they can hold `original - defended` in place
        # (no copy of the whole gradient); a transform that returned its input changed nothing.
        changed = [
            g.sub_(d) for g, d in zip(originals, defended, strict=True) if not _aliases(d, g)
        ]
        self._record(grad_sq, global_norm(changed).square(), defended)
        for g, d in zip(grads, defended, strict=True):
            if not _aliases(d, g):
                g.copy_(d if scale == 1.0 else d * scale)

    def _pass_through(self, grad_sq: Tensor, grads: list[Tensor]) -> None:
        """Leave a non-finite gradient as it is; warn the first time."""
        self.non_finite += 1
        if self.non_finite == 1:
            warnings.warn(
                "GradientDefense: the gradient has NaN or infinite entries (a NaN loss, an "
                "overflow, or an AMP loss scale too high); it is passed on unchanged, undefended, "
                "so the optimizer and your own NaN handling see it as they would without the "
                "defense. Later steps with a non-finite gradient are counted in "
                "`non_finite`, not warned about.",
                RuntimeWarning,
                stacklevel=3,
            )
        self._record(grad_sq, torch.zeros_like(grad_sq), grads)

    def _record(self, grad_sq: Tensor, pert_sq: Tensor, defended: list[Tensor]) -> None:
        stats = {"grad_sq": grad_sq, "pert_sq": pert_sq}
        if self._sparsifies:
            stats["zeros"] = torch.stack([(d == 0).sum() for d in defended]).sum().float()
            stats["numel"] = torch.tensor(float(sum(d.numel() for d in defended)))
        for key, value in stats.items():
            self._stats[key] = self._stats[key] + value if key in self._stats else value

    def pop_statistics(self) -> dict[str, Tensor]:
        """The step's sums: ``grad_sq``, ``pert_sq`` (and ``zeros``, ``numel`` when pruning)."""
        stats, self._stats = self._stats, {}
        return stats


def _aliases(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors start at the same memory (a transform returned its input)."""
    return a.data_ptr() == b.data_ptr()
