"""k-center greedy, FairFAL's diversity stage (fairfal_sampling.py l.207-234).

Despite the authors' function name (``..._kmeans_maxscore``) no k-means runs:
candidates are picked one at a time, each the one farthest from everything
chosen so far, where "chosen so far" starts as the anchors (the client's
labeled samples of the same class) or, without anchors, as the most
uncertain candidate.
"""

from __future__ import annotations

import numpy as np

DISTANCES = ("euclidean-squared", "cosine")


def pairwise_distances(a: np.ndarray, b: np.ndarray, metric: str = "euclidean-squared") -> np.ndarray:
    """|a|×|b| distances: squared Euclidean (the code's default) or 1 − cosine similarity."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if metric == "cosine":
        a = a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)
        b = b / (np.linalg.norm(b, axis=1, keepdims=True) + 1e-12)
        return 1.0 - np.clip(a @ b.T, -1.0, 1.0)
    if metric != "euclidean-squared":
        raise ValueError(f"fairfal-distance: unknown distance {metric!r}; allowed: {', '.join(DISTANCES)}")
    return (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)


def kcenter_greedy(
    points: np.ndarray,
    k: int,
    scores: np.ndarray | None = None,
    anchors: np.ndarray | None = None,
    metric: str = "euclidean-squared",
) -> np.ndarray:
    """Positions (into ``points``) of ``k`` distinct picks, in the order chosen.

    With anchors, every candidate starts at its distance to the nearest
    anchor; without, the first pick is ``argmax(scores)`` (the most uncertain;
    position 0 when no scores are given). ``k >= len(points)`` returns all.
    """
    count = len(points)
    if k <= 0 or count == 0:
        return np.empty(0, dtype=np.int64)
    if count <= k:
        return np.arange(count, dtype=np.int64)
    selected: list[int] = []
    if anchors is not None and len(anchors):
        nearest = pairwise_distances(points, anchors, metric).min(axis=1)
    else:
        first = int(np.argmax(scores)) if scores is not None else 0
        selected.append(first)
        nearest = pairwise_distances(points, points[[first]], metric)[:, 0]
        nearest[first] = -np.inf
    while len(selected) < k:
        pick = int(np.argmax(nearest))
        selected.append(pick)
        nearest = np.minimum(nearest, pairwise_distances(points, points[[pick]], metric)[:, 0])
        nearest[selected] = -np.inf
    return np.asarray(selected, dtype=np.int64)
