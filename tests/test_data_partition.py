"""Partitions: complete, deterministic, and as skewed as alpha says."""

from __future__ import annotations

import numpy as np
import pytest

from fedlt_app.data import PARTITIONS, longtail_counts, partition_indices, sample_dirichlet


@pytest.fixture(scope="module")
def lt_labels() -> np.ndarray:
    """Labels of a CIFAR-10-shaped long-tailed set (IR 100), in shuffled order."""
    counts = longtail_counts([5000] * 10, "exp", 100)
    labels = np.repeat(np.arange(10), counts)
    return np.random.default_rng(123).permutation(labels)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    assert all(part.dtype == np.int64 for part in parts)
    merged = np.concatenate(parts)
    assert merged.size == n
    assert np.array_equal(np.sort(merged), np.arange(n))


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_every_sample_exactly_once(lt_labels: np.ndarray, scheme: str) -> None:
    parts = partition_indices(lt_labels, scheme, 10, 0.5, seed=0)
    assert len(parts) == 10
    _assert_exact_cover(parts, lt_labels.size)
    assert all(part.size > 0 for part in parts)


@pytest.mark.parametrize("num_clients", [1, 7, 50])
def test_quota_scheme_gives_equal_quotas(lt_labels: np.ndarray, num_clients: int) -> None:
    parts = partition_indices(lt_labels, "dirichlet", num_clients, 0.1, seed=3)
    quota = lt_labels.size // num_clients
    assert [p.size for p in parts[:-1]] == [quota] * (num_clients - 1)
    assert parts[-1].size == lt_labels.size - (num_clients - 1) * quota
    _assert_exact_cover(parts, lt_labels.size)


def test_iid_sizes_differ_by_at_most_one(lt_labels: np.ndarray) -> None:
    sizes = [p.size for p in partition_indices(lt_labels, "iid", 7, 1.0, seed=0)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_deterministic_per_seed(lt_labels: np.ndarray, scheme: str) -> None:
    first = partition_indices(lt_labels, scheme, 10, 1.0, seed=7)
    again = partition_indices(lt_labels, scheme, 10, 1.0, seed=7)
    other = partition_indices(lt_labels, scheme, 10, 1.0, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def _mean_max_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    shares = [np.bincount(labels[p], minlength=10).max() / p.size for p in parts]
    return float(np.mean(shares))


@pytest.mark.parametrize("scheme", ["dirichlet", "dirichlet-per-class"])
def test_skew_grows_as_alpha_shrinks(lt_labels: np.ndarray, scheme: str) -> None:
    skew = [
        np.mean(
            [_mean_max_share(lt_labels, partition_indices(lt_labels, scheme, 10, alpha, seed)) for seed in range(3)]
        )
        for alpha in (100.0, 1.0, 0.05)
    ]
    assert skew[0] < skew[1] < skew[2], skew
    # Near-iid at alpha = 100: each client's largest class is about the global head share.
    head_share = np.bincount(lt_labels).max() / lt_labels.size
    assert abs(skew[0] - head_share) < 0.05


def test_quota_scheme_tiny_alpha_has_no_nan(lt_labels: np.ndarray) -> None:
    # alpha * p_tail is ~2e-7 here: the log-space Dirichlet must stay valid.
    parts = partition_indices(lt_labels, "dirichlet", 20, 0.00005, seed=0)
    _assert_exact_cover(parts, lt_labels.size)


def test_sample_dirichlet_tiny_concentrations() -> None:
    rng = np.random.default_rng(0)
    for conc in (np.array([1e-4, 1e-5, 0.4]), np.full(10, 1e-200)):
        q = sample_dirichlet(conc, rng)
        assert np.all(np.isfinite(q)) and abs(q.sum() - 1) < 1e-12 and np.all(q >= 0)


def test_sample_dirichlet_mean() -> None:
    rng = np.random.default_rng(0)
    conc = np.array([0.5, 1.5, 3.0])
    draws = np.stack([sample_dirichlet(conc, rng) for _ in range(20000)])
    assert np.allclose(draws.mean(axis=0), conc / conc.sum(), atol=0.01)


@pytest.mark.parametrize("scheme", ["dirichlet", "dirichlet-per-class"])
@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_bad_alpha(lt_labels: np.ndarray, scheme: str, alpha: float) -> None:
    with pytest.raises(ValueError, match="dirichlet-alpha"):
        partition_indices(lt_labels, scheme, 10, alpha, seed=0)


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_bad_client_counts(scheme: str) -> None:
    labels = np.array([0, 1, 1, 2])
    with pytest.raises(ValueError, match="num-partitions"):
        partition_indices(labels, scheme, 5, 1.0, seed=0)
    with pytest.raises(ValueError, match="num-partitions"):
        partition_indices(labels, scheme, 0, 1.0, seed=0)


def test_unknown_scheme(lt_labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="partition"):
        partition_indices(lt_labels, "pathological", 10, 1.0, seed=0)


def test_per_class_failure_is_explained(lt_labels: np.ndarray) -> None:
    # 200 clients at alpha 0.01 cannot all get 10 samples: flwr-datasets gives up.
    with pytest.raises(ValueError, match="dirichlet-alpha / num-partitions"):
        partition_indices(lt_labels, "dirichlet-per-class", 200, 0.01, seed=0)
