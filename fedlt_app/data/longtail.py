"""Turn a balanced training set into a long-tailed one.

The counts follow the authors' released code rather than the paper's formula
with a common n_0: each class keeps a fraction of its *own* original count,
which matters for MNIST, whose classes are not equally large.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMBALANCE_PROFILES = ("exp", "step")


def longtail_counts(
    class_counts: Sequence[int],
    profile: str,
    imbalance_ratio: float,
    minority_classes: Sequence[int] = (0, 7, 8),
) -> list[int]:
    """Per-class sample counts of the long-tailed training set.

    "exp" keeps int(n_c * (1/IR) ** (c/(C-1))), the authors' float expression
    verbatim: the counts are truncated, so an algebraically equal rewrite
    could move a count by one where the product lands on an integer. "step" (the paper's
    "binary" setting) shrinks only ``minority_classes`` to int(n_c / IR).
    ``minority_classes`` is ignored by "exp".
    """
    counts = [int(n) for n in class_counts]
    if not counts or any(n < 0 for n in counts):
        raise ValueError(f"class counts must be a non-empty list of non-negative ints, got {counts}")
    if profile not in IMBALANCE_PROFILES:
        raise ValueError(
            f"imbalance-profile: unknown profile {profile!r}; allowed values are {', '.join(IMBALANCE_PROFILES)}"
        )
    ratio = float(imbalance_ratio)
    if not np.isfinite(ratio) or ratio < 1.0:
        raise ValueError(
            f"imbalance-ratio: must be a finite number >= 1 (max/min class count), got {imbalance_ratio!r}"
        )
    num_classes = len(counts)
    if profile == "exp":
        if num_classes == 1:
            return counts
        return [int(n * (1 / ratio) ** (c / (num_classes - 1))) for c, n in enumerate(counts)]
    minority = {int(c) for c in minority_classes}
    bad = sorted(c for c in minority if not 0 <= c < num_classes)
    if bad:
        raise ValueError(f"minority-classes: classes {bad} are out of range; allowed are 0..{num_classes - 1}")
    return [int(n / ratio) if c in minority else n for c, n in enumerate(counts)]


def longtail_indices(labels: np.ndarray, counts: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Draw ``counts[c]`` of class c's own samples at random.

    Sorted output keeps the original data order, so the subset depends only on
    the generator's state and not on how the caller iterates over classes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(counts)):
        raise ValueError(f"labels span 0..{labels.max()} but counts are given for {len(counts)} classes")
    chosen: list[np.ndarray] = []
    for cls, wanted in enumerate(counts):
        own = np.flatnonzero(labels == cls)
        if not 0 <= wanted <= own.size:
            raise ValueError(f"class {cls}: cannot draw {wanted} samples, it has {own.size}")
        chosen.append(rng.choice(own, size=int(wanted), replace=False))
    return np.sort(np.concatenate(chosen).astype(np.int64))


def tail_classes(counts: Sequence[int], fraction: float = 0.3) -> list[int]:
    """Return the classes reported as "tail": the ``fraction`` with the fewest samples.

    Ranked by count rather than by index so the step profile's tail (e.g.
    classes 0, 7, 8) is found too; under "exp" this equals the authors'
    "indices >= int(0.7 C)". Ties go to the higher index, which is the tail
    end of the exponential profile.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"tail fraction must be in (0, 1], got {fraction}")
    num_classes = len(counts)
    # The small epsilon stops e.g. (1 - 0.3) * 10 = 6.999... from losing a class.
    num_head = int((1.0 - fraction) * num_classes + 1e-9)
    ranked = sorted(range(num_classes), key=lambda c: (int(counts[c]), -c))
    return sorted(ranked[: num_classes - num_head])
