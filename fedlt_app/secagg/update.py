"""The FedAvg-shaped vector: what a client of a sums-only method sends, and what the server gets back.

Segments: ``n`` (exact), ``clipped`` (exact: coordinates this client had to clip), ``loss`` (n * mean
loss) and, per array of the travelling state, n * (theta_k - theta_global).  Deltas, not weights: they
are small, so the clipping range is generous.  The server divides the sums by the summed n, which is
exactly FedAvg's weighted mean (Eq. 14's Σ_k (n_k / n) θ_k) up to the fixed-point bound.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlt_app.secagg.layout import Layout, Segment

COUNT, CLIPPED, LOSS = "n", "clipped", "loss"
_PREFIX = "arrays."


def fedavg_layout(global_arrays: Mapping[str, np.ndarray]) -> Layout:
    """The layout for a model with these arrays (their order and shapes; both ends compute it alike)."""
    return Layout((Segment(COUNT, (1,), "exact"), Segment(CLIPPED, (1,), "exact"), Segment(LOSS, (1,)),
                   *(Segment(_PREFIX + k, tuple(v.shape)) for k, v in global_arrays.items())))


def pack_update(layout: Layout, global_arrays: Mapping[str, np.ndarray], local_arrays: Mapping[str, np.ndarray],
                num_examples: int, mean_loss: float, rng: np.random.Generator) -> np.ndarray:
    """One client's encoded vector (uint64), the number of clipped coordinates counted inside it."""
    values = {COUNT: np.array([num_examples]), CLIPPED: np.array([0]), LOSS: np.array([num_examples * mean_loss])}
    for k, g in global_arrays.items():
        values[_PREFIX + k] = num_examples * (np.asarray(local_arrays[k], np.float64) - np.asarray(g, np.float64))
    values[CLIPPED] = np.array([sum(int(np.count_nonzero(np.abs(v) > layout.codec.clip))
                                    for k, v in values.items() if k.startswith(_PREFIX) or k == LOSS)])
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
