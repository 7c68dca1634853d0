"""Fixed-point encoding of float arrays into Z_M, M = 2^64, with seeded stochastic rounding.

Why stochastic rounding: round-to-nearest biases every coordinate of every client the same way, and
the bias adds up over a cohort; rounding up with probability equal to the fractional part is unbiased,
so the decoded sum is off by at most N/s (N clients, scale s) and by ~sqrt(N)/(2s) typically.  The
generator is seeded by the caller (run seed, round, node) so that a run is reproducible.

Why 2^64: numpy's uint64 arithmetic is exactly arithmetic mod 2^64 (it wraps), so masking and summing
need no big integers.  A value is stored in two's complement; the sum decodes correctly as long as
|sum of the integers| < 2^63, which ``FixedPoint`` guarantees for ``max_clients`` clients by refusing
a (scale, clip, max_clients) triple with max_clients * (clip * 2^scale_bits + 1) >= 2^63.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODULUS_BITS = 64
_SIGNED_LIMIT = 2 ** (MODULUS_BITS - 1)  # |sum| must stay below this


@dataclass(frozen=True)
class FixedPoint:
    """Codec for one cohort: values clipped to [-clip, clip], resolution 2^-scale_bits.

    Default: resolution 2^-24 (6e-8), clip 2^21 (2.1e6), 131,072 clients; per client and coordinate
    the rounding error is below 2^-24, so an average over the cohort is off by less than 2^-24.
    """

    scale_bits: int = 24
    clip: float = float(2**21)
    max_clients: int = 2**17

    def __post_init__(self) -> None:
        if not 0 <= self.scale_bits <= 52:
            raise ValueError(f"scale_bits must be in [0, 52], got {self.scale_bits}")
        if not self.clip > 0:
            raise ValueError(f"clip must be positive, got {self.clip}")
        if self.max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {self.max_clients}")
        if self.max_clients * self.max_abs_int >= _SIGNED_LIMIT:
            raise ValueError(
                f"fixed point overflows: {self.max_clients} clients x (clip {self.clip} x 2^{self.scale_bits} + 1) "
                f">= 2^{MODULUS_BITS - 1}; lower clip, scale_bits or max_clients")

    @property
    def scale(self) -> float:
        """s = 2^scale_bits: one integer step is 1/s."""
        return float(2**self.scale_bits)

    @property
    def max_abs_int(self) -> int:
        """The largest |integer| one client's coordinate can encode to (clip * s, rounded up, + 1 margin)."""
        return int(np.ceil(self.clip * self.scale)) + 1

    def sum_error_bound(self, n_clients: int) -> float:
        """Worst-case |decoded sum - true sum| per coordinate for unclipped inputs: each client < 1/s."""
        return n_clients / self.scale

    def encode(self, values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Float array -> flat uint64 array in Z_{2^64}; returns (encoded, number of clipped coordinates).

        Rounds floor(x*s) up with probability frac(x*s), drawn from ``rng`` (one draw per coordinate).
        """
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(x)):
            raise ValueError("fixed-point encoding refuses NaN or infinite values")
        clipped = int(np.count_nonzero(np.abs(x) > self.clip))
        scaled = np.clip(x, -self.clip, self.clip) * self.scale  # power-of-two scale: exact in float64
        low = np.floor(scaled)
        up = rng.random(scaled.shape) < (scaled - low)
        ints = low.astype(np.int64) + up.astype(np.int64)
        return ints.view(np.uint64), clipped

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        """Z_{2^64} (a single encoding or a sum of encodings) -> float64 values."""
        return decode_exact(encoded) / self.scale


def encode_exact(values: np.ndarray, bound: int) -> np.ndarray:
    """Integers (sample counts, holder flags) -> Z_{2^64} exactly; refuses non-integers and |v| > bound."""
    x = np.asarray(values).reshape(-1)
    if x.size and not float(np.abs(x).max()) <= bound:  # also refuses NaN
        raise ValueError(f"an exact value exceeds its bound {bound}")
    ints = np.rint(x).astype(np.int64)
    if not np.array_equal(ints, x):
        raise ValueError("an exact segment holds only integers")
    return ints.view(np.uint64)


def decode_exact(encoded: np.ndarray) -> np.ndarray:
    """Z_{2^64} -> signed int64 (two's complement), the inverse of ``encode_exact`` and of sums of it."""
    return np.ascontiguousarray(encoded, dtype=np.uint64).view(np.int64)
