"""How many synthetic images each class of a client needs: d_c = max(0, tau_c - n_c).

The target tau (``regl-target``; README "ReGL"):

* ``balanced-max``: tau_c = max_c n_c, every class filled up to the client's largest one (the reading
  closest to the paper's Fig. 1b; it recovers the global distribution when that is balanced);
* ``fixed``: tau_c = ``regl-synthetic-per-class`` (the axis of the paper's Fig. 5);
* ``global-prior`` (fedlt's extension for long-tailed global data): tau_c = round(max_c n_c * p_c / max_c p_c)
  with p the federation's class prior, from a summed class histogram. The client's largest class sets the
  scale, the prior the shape: a uniform prior gives ``balanced-max`` exactly.

Missing classes (n_c = 0) get the full tau_c; classes at or above their target get none.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TARGETS = ("balanced-max", "fixed", "global-prior")


def class_counts(labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """n_c of one client's labels."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.int64)


def targets(counts: Sequence[int], target: str, per_class: int = 0,
            global_counts: Sequence[int] | None = None) -> np.ndarray:
    """tau_c for every class (see the module's docstring)."""
    counts = np.asarray(counts, dtype=np.int64)
    if target == "balanced-max":
        return np.full_like(counts, counts.max(initial=0))
    if target == "fixed":
        return np.full_like(counts, int(per_class))
    if target == "global-prior":
        if global_counts is None or len(global_counts) != len(counts):
            raise ValueError("regl-target: 'global-prior' needs the federation's class counts, one per class")
        prior = np.asarray(global_counts, dtype=np.float64)
        if prior.max(initial=0) <= 0:
            raise ValueError("regl-target: 'global-prior' needs a class histogram with at least one sample")
        return np.rint(counts.max(initial=0) * prior / prior.max()).astype(np.int64)
    raise ValueError(f"regl-target: unknown target {target!r}; allowed values are {', '.join(TARGETS)}")


def shortfall(counts: Sequence[int], target: str, per_class: int = 0,
              global_counts: Sequence[int] | None = None) -> np.ndarray:
    """d_c = max(0, tau_c - n_c): the synthetic images class c needs."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.maximum(targets(counts, target, per_class, global_counts) - counts, 0)
