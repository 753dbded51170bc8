"""Seeds for independent random streams, derived without any global state.

A defense keys its noise by ``(seed, stream, step)``: the same triple always gives the same 63-bit
seed (so a run resumed from a checkpoint continues its streams) and distinct triples give
unrelated ones (so DDP ranks draw independent noise). The mixing function is SplitMix64
(Steele, Lea and Flood, OOPSLA 2014), whose outputs pass BigCrush for consecutive inputs.

Example:
    >>> derive_seed(0, 1, 5) == derive_seed(0, 1, 5), derive_seed(0, 1, 5) == derive_seed(0, 2, 5)
    (True, False)
"""

from __future__ import annotations

__all__ = ["derive_seed", "splitmix64"]

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One SplitMix64 step: a bijective 64-bit mix of ``x``.

    Example:
        >>> hex(splitmix64(0))
        '0xe220a8397b1dcdaf'
    """
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, stream: int, step: int) -> int:
    """A 63-bit seed for ``(seed, stream, step)``: distinct inputs give unrelated streams.

    Example:
        >>> 0 <= derive_seed(0, 1, 5) < 2**63
        True
    """
    x = splitmix64(seed & _MASK64)
    x = splitmix64(x ^ (stream & _MASK64))
    x = splitmix64(x ^ (step & _MASK64))
    return x >> 1
