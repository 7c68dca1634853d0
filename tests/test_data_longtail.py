"""Long-tail counts must reproduce the authors' published set sizes exactly."""

from __future__ import annotations

import numpy as np
import pytest

from fedlt_app.data import longtail_counts, longtail_indices, tail_classes

CIFAR10 = [5000] * 10
CIFAR100 = [500] * 100


def test_cifar10_ir100_exact_counts() -> None:
    assert longtail_counts(CIFAR10, "exp", 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize(
    ("class_counts", "ratio", "total"),
    [(CIFAR10, 100, 12406), (CIFAR10, 50, 13996), (CIFAR10, 10, 20431), (CIFAR100, 100, 10847)],
)
def test_published_totals(class_counts: list[int], ratio: float, total: int) -> None:
    counts = longtail_counts(class_counts, "exp", ratio)
    assert sum(counts) == total
    assert counts[0] == class_counts[0]
    assert counts[-1] == int(class_counts[-1] / ratio)


def test_exp_uses_each_class_own_count() -> None:
    mnist = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    counts = longtail_counts(mnist, "exp", 10)
    assert counts == [int(n * (1 / 10) ** (c / 9)) for c, n in enumerate(mnist)]
    assert counts[0] == 5923 and counts[9] == 594


def test_ratio_one_keeps_everything() -> None:
    assert longtail_counts(CIFAR10, "exp", 1) == CIFAR10
    assert longtail_counts(CIFAR10, "step", 1) == CIFAR10


def test_step_profile() -> None:
    counts = longtail_counts(CIFAR10, "step", 100, (0, 7, 8))
    assert counts == [50, 5000, 5000, 5000, 5000, 5000, 5000, 50, 50, 5000]
    assert longtail_counts([5923, 6742], "step", 10, (1,)) == [5923, 674]


def test_longtail_indices_draw_own_class_with_right_counts() -> None:
    labels = np.repeat(np.arange(5), 100)
    np.random.default_rng(1).shuffle(labels)
    counts = [100, 40, 17, 3, 0]
    picked = longtail_indices(labels, counts, np.random.default_rng(0))
    assert picked.dtype == np.int64
    assert np.all(np.diff(picked) > 0)  # sorted and unique
    assert np.bincount(labels[picked], minlength=5).tolist() == counts
    again = longtail_indices(labels, counts, np.random.default_rng(0))
    other = longtail_indices(labels, counts, np.random.default_rng(1))
    assert np.array_equal(picked, again)
    assert not np.array_equal(picked, other)


def test_longtail_indices_rejects_impossible_counts() -> None:
    labels = np.array([0, 0, 1])
    with pytest.raises(ValueError, match="class 1"):
        longtail_indices(labels, [1, 2], np.random.default_rng(0))
    with pytest.raises(ValueError):
        longtail_indices(labels, [1], np.random.default_rng(0))


def test_tail_classes_exp_and_step() -> None:
    assert tail_classes(longtail_counts(CIFAR10, "exp", 100)) == [7, 8, 9]
    assert tail_classes(longtail_counts(CIFAR100, "exp", 100)) == list(range(70, 100))
    assert tail_classes(longtail_counts(CIFAR10, "step", 10, (0, 7, 8))) == [0, 7, 8]
    # Balanced: ties go to the higher indices, as under the exponential profile.
    assert tail_classes(CIFAR10) == [7, 8, 9]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"profile": "linear", "imbalance_ratio": 10}, "imbalance-profile"),
        ({"profile": "exp", "imbalance_ratio": 0.5}, "imbalance-ratio"),
        ({"profile": "exp", "imbalance_ratio": float("nan")}, "imbalance-ratio"),
        ({"profile": "step", "imbalance_ratio": 10, "minority_classes": (0, 10)}, "minority-classes"),
        ({"profile": "step", "imbalance_ratio": 10, "minority_classes": (-1,)}, "minority-classes"),
    ],
)
def test_bad_config_names_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        longtail_counts(CIFAR10, **kwargs)  # type: ignore[arg-type]
