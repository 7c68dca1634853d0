"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Why this field: 2^521 - 1 is a Mersenne prime larger than any 32-byte secret, so a secret is one
field element (no chunking) and shares are 66 bytes.  Coefficients come from ``secrets`` (the OS's
cryptographic generator).  Share x-coordinates are the clients' 1-based positions in the cohort.
Fewer than ``threshold`` shares reveal nothing about the secret; ``recover`` refuses them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

PRIME = 2**521 - 1
SECRET_BYTES = 32
_Y_BYTES = (PRIME.bit_length() + 7) // 8


@dataclass(frozen=True)
class Share:
    """One point (x, f(x)) of the sharing polynomial f, with f(0) = the secret."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        """4-byte x then 66-byte y, big-endian."""
        return self.x.to_bytes(4, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Share:
        """Inverse of ``to_bytes``; refuses a wrong length or an out-of-field value."""
        if len(raw) != 4 + _Y_BYTES:
            raise ValueError(f"a share has {4 + _Y_BYTES} bytes, got {len(raw)}")
        share = cls(int.from_bytes(raw[:4], "big"), int.from_bytes(raw[4:], "big"))
        if not (0 < share.x < PRIME and 0 <= share.y < PRIME):
            raise ValueError("share outside the field")
        return share


SHARE_BYTES = 4 + _Y_BYTES


def split(secret: bytes, xs: list[int], threshold: int) -> dict[int, Share]:
    """Shares of ``secret`` at the distinct positive ``xs``; any ``threshold`` of them recover it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a shared secret has {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(xs)) != len(xs) or any(x <= 0 for x in xs):
        raise ValueError("share x-coordinates must be distinct and positive")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = Share(x, y)
    return shares


def recover(shares: list[Share], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at 0)."""
    if len({s.x for s in shares}) != len(shares):
        raise ValueError("duplicate share x-coordinates")
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares cannot recover a secret shared with threshold {threshold}")
    points = shares[:threshold]
    secret = 0
    for i, si in enumerate(points):
        num, den = 1, 1
        for j, sj in enumerate(points):
            if i != j:
                num = num * sj.x % PRIME
                den = den * (sj.x - si.x) % PRIME
        secret = (secret + si.y * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ValueError("the shares are inconsistent: the recovered value is not a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
