"""Per-class means over the clients that hold a class, written as two sums (what secure aggregation reveals).

RedGrape's prototype store (Eq. 15) and CReFF's real gradients are, per class c, the unweighted mean
of the clients' arrays over the clients that hold c. A mean is a sum divided by a count: each client
contributes, for every class, its array (zeros for a class it lacks) and a 0/1 holder flag; the
server divides the summed arrays by the summed flags. The plain path sums the same terms, so plain
and secure aggregation run one piece of server code and differ only by fixed-point rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedlt_app.methods.base import Payload, SumSpec


def class_sum_segments(num_classes: int, row_shapes: Mapping[str, tuple[int, ...]], holders: str) -> dict[str, SumSpec]:
    """One (num_classes, *row shape) real segment per key, and the exact holder counts."""
    segments = {key: SumSpec((num_classes, *shape)) for key, shape in row_shapes.items()}
    segments[holders] = SumSpec((num_classes,), exact=True)
    return segments


def class_summands(num_classes: int, classes: np.ndarray, rows: Mapping[str, np.ndarray], holders: str) -> Payload:
    """One client's terms: ``rows[key][i]`` belongs to class ``classes[i]``; absent classes are zero rows."""
    classes = np.asarray(classes, dtype=np.int64)
    out: Payload = {}
    for key, value in rows.items():
        dense = np.zeros((num_classes, *np.shape(value)[1:]), dtype=np.float64)
        dense[classes] = value
        out[key] = dense
    flags = np.zeros(num_classes, dtype=np.int64)
    flags[classes] = 1
    out[holders] = flags
    return out


def summed(segments: Mapping[str, SumSpec], terms: Iterable[Payload]) -> Payload:
    """The plain sum of clients' summands, in the dtypes secure aggregation decodes to (zeros for no client)."""
    total = {k: np.zeros(s.shape, dtype=np.int64 if s.exact else np.float64) for k, s in segments.items()}
    for term in terms:
        for key in total:
            total[key] += term[key]
    return total


def class_means(sums: Payload, keys: Iterable[str], holders: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(classes some client holds, as a mask; per key the mean rows of those classes, float64)."""
    count = np.asarray(sums[holders], dtype=np.int64)
    fresh = count > 0
    means = {}
    for key in keys:
        rows = np.asarray(sums[key], dtype=np.float64)[fresh]
        means[key] = rows / count[fresh].reshape(-1, *([1] * (rows.ndim - 1)))
    return fresh, means
