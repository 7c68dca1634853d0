"""The FedAvg-shaped vector: what a client of a sums-only method sends, and what the server gets back.

Segments: ``n`` (exact), ``clipped`` (exact: coordinates this client had to clip), ``loss`` (n * mean
loss), with a method that weighs clients other than by n (``ServerMethod.client_weighting``) ``weight``
(exact: the client's weight w), per array of the travelling state w * (theta_k - theta_global), then the
method's own sums (``method.<name>``: RedGrape's per-class prototype sums and holder counts,
``ServerMethod.sum_segments``) and the masked metrics (``metric.<name>`` and ``metric-count.<name>``: a
per-client train-reply metric such as the personalised accuracy, summed, and how many clients reported
it). Deltas, not weights: they are small, so the clipping range is generous.  The server divides the
sums by the summed w, which is exactly FedAvg's weighted mean (Eq. 14's Σ_k (n_k / n) θ_k; w = n) or
the unweighted mean (w = 1) up to the fixed-point bound, and a metric's sum by its count (the cohort's
mean: no client's own value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedlt_app.secagg.fixedpoint import FixedPoint
from fedlt_app.secagg.layout import Layout, Segment

if TYPE_CHECKING:
    from fedlt_app.methods.base import SumSpec

COUNT, CLIPPED, LOSS, WEIGHT = "n", "clipped", "loss", "weight"
_PREFIX = "arrays."
METHOD_PREFIX = "method."
METRIC_PREFIX, METRIC_COUNT_PREFIX = "metric.", "metric-count."
# How the model average weighs a client (ServerMethod.client_weighting): by its sample count n (FedAvg) or
# equally (FedNH's unweighted mean). Under secure aggregation each client weighs its own delta.
WEIGHTINGS = ("examples", "uniform")


def client_weight(weighting: str, num_examples: int) -> int:
    """A client's model-averaging weight under ``weighting``: n, or 1."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"client weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return num_examples if weighting == "examples" else 1


def method_segments(specs: Mapping[str, SumSpec]) -> tuple[Segment, ...]:
    """A method's ``sum_segments`` as layout segments (prefixed, so they never clash with the model's)."""
    return tuple(Segment(METHOD_PREFIX + name, tuple(spec.shape), "exact" if spec.exact else "fixed")
                 for name, spec in specs.items())


def metric_segments(names: Sequence[str]) -> tuple[Segment, ...]:
    """Per masked metric: the clients' summed values (fixed point) and how many reported one (exact)."""
    return tuple(segment for name in names for segment in (Segment(METRIC_PREFIX + name, (1,)),
                                                           Segment(METRIC_COUNT_PREFIX + name, (1,), "exact")))


def fedavg_layout(global_arrays: Mapping[str, np.ndarray], extra: Sequence[Segment] = (),
                  weighting: str = "examples") -> Layout:
    """The layout for a model with these arrays (their order and shapes; both ends compute it alike),
    followed by ``extra`` (``method_segments``, ``metric_segments``: the server names them in the train
    message, and the weighting when it is not by n)."""
    client_weight(weighting, 0)  # refuses an unknown weighting
    weight = (Segment(WEIGHT, (1,), "exact"),) if weighting != "examples" else ()
    return Layout((Segment(COUNT, (1,), "exact"), Segment(CLIPPED, (1,), "exact"), Segment(LOSS, (1,)), *weight,
                   *(Segment(_PREFIX + k, tuple(v.shape)) for k, v in global_arrays.items()), *extra))


def _weighted_by_count(layout: Layout) -> bool:
    return all(s.name != WEIGHT for s in layout.segments)


def _method_values(layout: Layout, summands: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """The method's terms under their segment names; refused unless they are exactly the layout's ``method.``
    segments (a client whose method disagrees with the server's would otherwise corrupt everyone's sum)."""
    asked = sorted(s.name[len(METHOD_PREFIX):] for s in layout.segments if s.name.startswith(METHOD_PREFIX))
    if asked != sorted(summands):
        raise ValueError(f"secure aggregation: the server asks for the {what} {asked}, "
                         f"this client's method gives {sorted(summands)}")
    return {METHOD_PREFIX + k: np.asarray(v) for k, v in summands.items()}


def _pack_counting_clipped(layout: Layout, values: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The encoded vector, with the ``clipped`` segment set to how many fixed-point coordinates the codec clips."""
    values[CLIPPED] = np.array([sum(int(np.count_nonzero(np.abs(values[s.name]) > layout.codec.clip))
                                    for s in layout.segments if s.kind == "fixed")])
    vector, _ = layout.pack(values, rng)
    return vector


def pack_update(layout: Layout, global_arrays: Mapping[str, np.ndarray], local_arrays: Mapping[str, np.ndarray],
                num_examples: int, mean_loss: float, rng: np.random.Generator,
                summands: Mapping[str, np.ndarray] | None = None,
                metrics: Mapping[str, float] | None = None) -> np.ndarray:
    """One client's encoded vector (uint64), the number of clipped coordinates counted inside it.

    ``summands``: the method's terms, one per ``method.`` segment of the layout, unweighted (the server
    divides their sums by its own counts, e.g. holders); refused when they do not match the layout.
    ``metrics``: this client's train-reply metrics; those the layout names (``metric.``) go in with a
    count of 1, a named one the client lacks as 0 with count 0, and every other one is dropped.
    The deltas carry weight n, or 1 where the layout has a ``weight`` segment (uniform weighting).
    """
    weight = num_examples if _weighted_by_count(layout) else 1
    values = {COUNT: np.array([num_examples]), CLIPPED: np.array([0]), LOSS: np.array([num_examples * mean_loss])}
    if not _weighted_by_count(layout):
        values[WEIGHT] = np.array([weight])
    for k, g in global_arrays.items():
        values[_PREFIX + k] = weight * (np.asarray(local_arrays[k], np.float64) - np.asarray(g, np.float64))
    for s in layout.segments:
        if s.name.startswith(METRIC_PREFIX):
            name = s.name[len(METRIC_PREFIX):]
            reported = metrics is not None and name in metrics
            values[s.name] = np.array([float(metrics[name]) if reported else 0.0])  # type: ignore[index]
            values[METRIC_COUNT_PREFIX + name] = np.array([int(reported)])
    values.update(_method_values(layout, summands or {}, "sums"))
    return _pack_counting_clipped(layout, values, rng)


def unpack_average(layout: Layout, global_arrays: Mapping[str, np.ndarray],
                   total: np.ndarray) -> tuple[dict[str, np.ndarray], int, float, int]:
    """(weighted-mean arrays in their dtypes, summed n, n-weighted mean loss, clipped coordinates) from a sum.

    The arrays' weights are the n, or the ``weight`` segment's (uniform: 1 per client); the loss is always
    n-weighted, as the plain path's train loss.
    """
    sums = layout.unpack(total)
    n = int(sums[COUNT][0])
    if n <= 0:
        raise ValueError(f"the secure sum holds {n} examples")
    weight = n if _weighted_by_count(layout) else int(sums[WEIGHT][0])
    if weight <= 0:
        raise ValueError(f"the secure sum holds a total weight of {weight}")
    arrays = {}
    for k, g in global_arrays.items():
        mean = np.asarray(g, np.float64) + sums[_PREFIX + k] / weight
        arrays[k] = np.rint(mean).astype(g.dtype) if g.dtype.kind in "iub" else mean.astype(g.dtype)
    return arrays, n, float(sums[LOSS][0]) / n, int(sums[CLIPPED][0])


def unpack_method_sums(layout: Layout, total: np.ndarray) -> dict[str, np.ndarray]:
    """The method's sums from a summed vector, by their ``sum_segments`` names (float64 real, int64 exact)."""
    return {k[len(METHOD_PREFIX):]: v for k, v in layout.unpack(total).items() if k.startswith(METHOD_PREFIX)}


def unpack_metric_means(layout: Layout, total: np.ndarray) -> dict[str, float]:
    """Each masked metric's mean over the clients that reported it (sum / count); left out where none did."""
    sums = layout.unpack(total)
    means = {}
    for key, value in sums.items():
        if key.startswith(METRIC_PREFIX):
            name = key[len(METRIC_PREFIX):]
            count = int(sums[METRIC_COUNT_PREFIX + name][0])
            if count > 0:
                means[name] = float(value[0]) / count
    return means


# A statistics query's codec trades resolution for range: second moments of features summed over a client's
# samples (CCVR's Σ x xᵀ: up to ~10² per sample over hundreds of samples) reach 10^6 and beyond, where a
# model delta stays below 1. 2^-16 per client and coordinate still loses nothing that a covariance keeps;
# 2^17 clients x (2^29 x 2^16 + 1) < 2^63, so the sum cannot wrap.
STATISTICS_CODEC = FixedPoint(scale_bits=16, clip=float(2**29))


def sums_layout(extra: Sequence[Segment]) -> Layout:
    """The layout of a statistics query under secure aggregation: the clipped-coordinate counter, then the
    method's sums (``method_segments`` of its ``statistics_sum_segments``); no model, no count, no loss."""
    return Layout((Segment(CLIPPED, (1,), "exact"), *extra), STATISTICS_CODEC)


def pack_sums(layout: Layout, summands: Mapping[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One client's encoded statistics vector; refused when its summands do not match the layout's sums."""
    return _pack_counting_clipped(layout, _method_values(layout, summands, "statistics sums"), rng)


def unpack_sums(layout: Layout, total: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """(the method's statistics sums by name, clipped coordinates) from a summed statistics vector."""
    sums = layout.unpack(total)
    return ({k[len(METHOD_PREFIX):]: v for k, v in sums.items() if k.startswith(METHOD_PREFIX)},
            int(sums[CLIPPED][0]))
