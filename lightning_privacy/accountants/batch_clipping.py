"""ε for batch clipping + Gaussian noise: ``GradientClipping(max_norm=C)`` + ``GaussianNoise(std)``.

The mechanism
-------------
Each optimizer step releases ``clip_C(g_B) + N(0, std^2 I)``, where ``g_B`` is the gradient of the
(mean) loss over batch ``B`` and ``clip_C`` rescales the whole vector to norm at most ``C``.

Adjacency and sensitivity
-------------------------
*Replace-one* adjacency: two data sets of the same size differ in one example, at the same index.
Whatever the batch contains, both clipped batch gradients lie in the ball of radius ``C``, so
their difference has norm at most ``2C`` (L2 sensitivity ``2C``). One step is therefore a
Gaussian mechanism with noise multiplier ``z = std / (2C)``.

Composition
-----------
The batches of an epoch partition the training set (a shuffle without replacement, drawn
independently of the data), so the changed example is in exactly one batch per epoch and the other
releases of that epoch do not depend on it: one epoch costs one Gaussian mechanism per release
that contains it (``releases_per_epoch``). Epochs compose adaptively; the RDP of ``E`` epochs is
that of ``E * releases_per_epoch`` Gaussian mechanisms, computed with Opacus's RDP analysis at
``sample_rate=1`` (no amplification by sampling is claimed).

Assumptions (the ε means nothing if one fails)
----------------------------------------------
* The clipping is on the batch gradient that is noised and released, and the noise is Gaussian
  with std ``std`` on that clipped vector, drawn fresh and independently every step.
* Each example appears in at most ``releases_per_epoch`` releases per epoch (``1``: one batch per
  epoch stepped once; a batch stepped ``k`` times, ``k`` optimizers each clipped and noised, or an
  example drawn into ``d`` batches multiply it). ``GradientDefense`` counts the defended
  optimizer steps per batch and reads the sampler's draws per example (with replacement: every
  release of the epoch); partial epochs count as whole ones.
* The noise is added once to the released vector. Under DDP this is the aggregate view (same
  clipped global gradient, noise added once); independent per-rank noise is a different mechanism.
* δ is the caller's; a common choice is ``δ < 1/N``.

Batch clipping gives a much weaker ε than DP-SGD at the same noise: there is no amplification by
subsampling and the sensitivity is the whole clip radius ``2C`` rather than ``C``.

Example:
    >>> acct = BatchClippingAccountant(max_grad_norm=1.0, std=8.0)
    >>> acct.noise_multiplier
    4.0
    >>> acct.step(epochs=3)
    >>> acct.epochs, round(acct.get_epsilon(1e-5), 3) > 0
    (3, True)
    >>> thrice = BatchClippingAccountant(max_grad_norm=1.0, std=8.0)
    >>> thrice.step(epochs=3, releases_per_epoch=3)  # e.g. every batch stepped 3 times
    >>> thrice.releases, thrice.get_epsilon(1e-5) > acct.get_epsilon(1e-5)
    (9, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_privacy._validation import check_float, check_int
from lightning_privacy.accountants.base import Accountant
from lightning_privacy.accountants.gaussian import RDPAccountant
from lightning_privacy.functional.accounting import batch_clipping_noise_multiplier, check_delta


class BatchClippingAccountant(Accountant):
    """RDP accountant for batch clipping + Gaussian noise, one Gaussian mechanism per epoch.

    Args:
        max_grad_norm: ``C``, the norm the batch gradient is clipped to.
        std: Standard deviation of the Gaussian noise added to the clipped batch gradient
            (``GaussianNoise(std=sigma * C)``). The effective noise multiplier is ``std / (2C)``.

    Attributes:
        noise_multiplier: ``std / (2 * max_grad_norm)`` (sensitivity ``2C``, replace-one).
        epochs: Epochs recorded so far.
        releases: Gaussian mechanisms composed so far (releases one example took part in).

    Example:
        >>> acct = BatchClippingAccountant(max_grad_norm=1.0, std=2.0)
        >>> acct.get_epsilon(1e-5)
        0.0
        >>> acct.step()
        >>> state = acct.state_dict()
        >>> other = BatchClippingAccountant(max_grad_norm=1.0, std=2.0)
        >>> other.load_state_dict(state)
        >>> other.get_epsilon(1e-5) == acct.get_epsilon(1e-5)
        True
    """

    mechanism = "batch_clipping"

    def __init__(self, *, max_grad_norm: float, std: float) -> None:
        self.max_grad_norm = check_float("max_grad_norm", max_grad_norm, low=0.0, low_open=True)
        self.std = check_float("std", std, low=0.0, low_open=True)
        self.noise_multiplier = batch_clipping_noise_multiplier(
            max_grad_norm=self.max_grad_norm, std=self.std
        )
        self._rdp = RDPAccountant()
        self._epochs = 0

    @property
    def epochs(self) -> int:
        """Epochs recorded so far."""
        return self._epochs

    @property
    def releases(self) -> int:
        """Gaussian mechanisms composed so far."""
        return self._rdp.steps

    def step(self, epochs: int = 1, *, releases_per_epoch: int = 1) -> None:
        """Record ``epochs`` epochs of ``releases_per_epoch`` releases per example each.

        Each release one example takes part in is one Gaussian mechanism; ``0`` records an epoch
        that released nothing.
        """
        e = check_int("epochs", epochs, low=0)
        r = check_int("releases_per_epoch", releases_per_epoch, low=0)
        self._rdp.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=e * r)
        self._epochs += e

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (``0.0`` before the first epoch)."""
        return self._rdp.get_epsilon(check_delta(delta))

    def state_dict(self) -> dict[str, Any]:
        """Configuration and Opacus RDP history."""
        return {
            "max_grad_norm": self.max_grad_norm,
            "std": self.std,
            "epochs": self._epochs,
            "accountant": self._rdp.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the history; raises ``ValueError`` if ``max_grad_norm`` or ``std`` differ."""
        for key in ("max_grad_norm", "std"):
            if float(state_dict[key]) != getattr(self, key):
                raise ValueError(
                    f"Expected the saved `{key}` to equal this accountant's {getattr(self, key)}, "
                    f"but got {state_dict[key]!r}: the restored history would describe another "
                    "mechanism."
                )
        self._rdp.load_state_dict(state_dict["accountant"])
        self._epochs = int(state_dict.get("epochs", self._rdp.steps))

    def __repr__(self) -> str:
        return (
            f"BatchClippingAccountant(max_grad_norm={self.max_grad_norm}, std={self.std}, "
            f"epochs={self.epochs})"
        )
