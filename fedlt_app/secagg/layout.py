"""One dense vector per client: named segments, each fixed point or exact integers.

Why dense and fixed: the vector's length and layout are public (the server sends them), so a client
that lacks a class sends zeros in that class's prototype segment instead of leaving it out; otherwise
the message size would reveal which classes it holds.  Exact segments (sample counts, holder flags)
sum without rounding, so ``holders / count`` divisions see the true integers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedlt_app.secagg.fixedpoint import FixedPoint, decode_exact, encode_exact

Kind = Literal["fixed", "exact"]


@dataclass(frozen=True)
class Segment:
    """A named array of the vector: ``fixed`` values go through the codec, ``exact`` ones are integers."""

    name: str
    shape: tuple[int, ...]
    kind: Kind = "fixed"

    @property
    def size(self) -> int:
        """Number of coordinates."""
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class Layout:
    """The segments in order, and the codec that bounds them."""

    segments: tuple[Segment, ...]
    codec: FixedPoint = field(default_factory=FixedPoint)

    def __post_init__(self) -> None:
        names = [s.name for s in self.segments]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate segment names in {names}")
        for s in self.segments:
            if s.kind not in ("fixed", "exact"):
                raise ValueError(f"segment {s.name!r}: kind must be 'fixed' or 'exact', got {s.kind!r}")

    @property
    def length(self) -> int:
        """Total number of coordinates (the public vector length)."""
        return sum(s.size for s in self.segments)

    @property
    def exact_bound(self) -> int:
        """Largest |value| an exact segment accepts, so that max_clients of them cannot overflow."""
        return (2**63 - 1) // self.codec.max_clients

    def pack(self, values: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Segment arrays -> one uint64 vector; returns (vector, clipped fixed-point coordinates)."""
        missing = {s.name for s in self.segments} ^ set(values)
        if missing:
            raise ValueError(f"segments missing or unknown: {sorted(missing)}")
        parts, clipped = [], 0
        for s in self.segments:
            v = np.asarray(values[s.name])
            if v.shape != s.shape:
                raise ValueError(f"segment {s.name!r}: shape {v.shape}, layout says {s.shape}")
            if s.kind == "exact":
                parts.append(encode_exact(v, self.exact_bound))
            else:
                enc, c = self.codec.encode(v, rng)
                parts.append(enc)
                clipped += c
        return (np.concatenate(parts) if parts else np.zeros(0, np.uint64)), clipped

    def unpack(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """A packed vector or a sum of packed vectors -> float64 (fixed) / int64 (exact) arrays."""
        if vector.shape != (self.length,):
            raise ValueError(f"vector has shape {vector.shape}, layout length is {self.length}")
        out, start = {}, 0
        for s in self.segments:
            chunk = vector[start:start + s.size]
            decoded = decode_exact(chunk) if s.kind == "exact" else self.codec.decode(chunk)
            out[s.name] = decoded.reshape(s.shape)
            start += s.size
        return out
