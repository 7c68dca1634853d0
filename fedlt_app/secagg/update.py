"""The FedAvg-shaped vector: what a client of a sums-only method sends, and what the server gets back.

Segments: ``n`` (exact), ``clipped`` (exact: coordinates this client had to clip), ``loss`` (n * mean
loss), per array of the travelling state n * (theta_k - theta_global), then the method's own sums
(``method.<name>``: RedGrape's per-class prototype sums and holder counts, ``ServerMethod.sum_segments``).
Deltas, not weights: they are small, so the clipping range is generous.  The server divides the sums
by the summed n, which is exactly FedAvg's weighted mean (Eq. 14's Σ_k (n_k / n) θ_k) up to the
fixed-point bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedlt_app.secagg.layout import Layout, Segment

if TYPE_CHECKING:
    from fedlt_app.methods.base import SumSpec

COUNT, CLIPPED, LOSS = "n", "clipped", "loss"
_PREFIX = "arrays."
METHOD_PREFIX = "method."


def method_segments(specs: Mapping[str, SumSpec]) -> tuple[Segment, ...]:
    """A method's ``sum_segments`` as layout segments (prefixed, so they never clash with the model's)."""
    return tuple(Segment(METHOD_PREFIX + name, tuple(spec.shape), "exact" if spec.exact else "fixed")
                 for name, spec in specs.items())


def fedavg_layout(global_arrays: Mapping[str, np.ndarray], extra: Sequence[Segment] = ()) -> Layout:
    """The layout for a model with these arrays (their order and shapes; both ends compute it alike),
    followed by ``extra`` (``method_segments``: the server names them in the train message)."""
    return Layout((Segment(COUNT, (1,), "exact"), Segment(CLIPPED, (1,), "exact"), Segment(LOSS, (1,)),
                   *(Segment(_PREFIX + k, tuple(v.shape)) for k, v in global_arrays.items()), *extra))


def pack_update(layout: Layout, global_arrays: Mapping[str, np.ndarray], local_arrays: Mapping[str, np.ndarray],
                num_examples: int, mean_loss: float, rng: np.random.Generator,
                summands: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """One client's encoded vector (uint64), the number of clipped coordinates counted inside it.

    ``summands``: the method's terms, one per ``method.`` segment of the layout, unweighted (the server
    divides their sums by its own counts, e.g. holders); refused when they do not match the layout.
    """
    values = {COUNT: np.array([num_examples]), CLIPPED: np.array([0]), LOSS: np.array([num_examples * mean_loss])}
    for k, g in global_arrays.items():
        values[_PREFIX + k] = num_examples * (np.asarray(local_arrays[k], np.float64) - np.asarray(g, np.float64))
    asked = sorted(s.name[len(METHOD_PREFIX):] for s in layout.segments if s.name.startswith(METHOD_PREFIX))
    given = sorted(summands or {})
    if asked != given:
        raise ValueError(f"secure aggregation: the server asks for the sums {asked}, "
                         f"this client's method gives {given}")
    values.update({METHOD_PREFIX + k: np.asarray(v) for k, v in (summands or {}).items()})
    values[CLIPPED] = np.array([sum(int(np.count_nonzero(np.abs(values[s.name]) > layout.codec.clip))
                                    for s in layout.segments if s.kind == "fixed")])
    vector, _ = layout.pack(values, rng)
    return vector


def unpack_average(layout: Layout, global_arrays: Mapping[str, np.ndarray],
                   total: np.ndarray) -> tuple[dict[str, np.ndarray], int, float, int]:
    """(weighted-mean arrays in their dtypes, summed n, weighted mean loss, clipped coordinates) from a sum."""
    sums = layout.unpack(total)
    n = int(sums[COUNT][0])
    if n <= 0:
        raise ValueError(f"the secure sum holds {n} examples")
    arrays = {}
    for k, g in global_arrays.items():
        mean = np.asarray(g, np.float64) + sums[_PREFIX + k] / n
        arrays[k] = np.rint(mean).astype(g.dtype) if g.dtype.kind in "iub" else mean.astype(g.dtype)
    return arrays, n, float(sums[LOSS][0]) / n, int(sums[CLIPPED][0])


def unpack_method_sums(layout: Layout, total: np.ndarray) -> dict[str, np.ndarray]:
    """The method's sums from a summed vector, by their ``sum_segments`` names (float64 real, int64 exact)."""
    return {k[len(METHOD_PREFIX):]: v for k, v in layout.unpack(total).items() if k.startswith(METHOD_PREFIX)}
