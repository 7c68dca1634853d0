"""The dir-balance partition: FairFAL's equal-size clients with Dirichlet label mixes."""

from __future__ import annotations

import numpy as np
import pytest

from fedlt_app.config import resolve
from fedlt_app.data import longtail_counts, partition_indices
from fedlt_app.data.partition import dir_balance, dir_balance_counts


def _toy_labels(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = longtail_counts([300] * 10, "exp", 20.0)
    return rng.permutation(np.repeat(np.arange(10), counts))


@pytest.mark.parametrize("beta", [0.1, 1.0, 100.0])
@pytest.mark.parametrize("num_clients", [3, 7, 10])
def test_columns_are_class_totals_and_rows_are_equal_quotas(beta: float, num_clients: int) -> None:
    labels = _toy_labels()
    totals = np.bincount(labels, minlength=10)
    counts = dir_balance_counts(totals, num_clients, beta, np.random.default_rng(5))
    assert (counts >= 0).all()
    assert (counts.sum(axis=0) == totals).all()
    rows = counts.sum(axis=1)
    floor, extra = divmod(labels.size, num_clients)
    assert (rows == floor + (np.arange(num_clients) < extra)).all()  # the first N mod K clients hold one more


def test_positions_cover_every_sample_once_and_match_the_counts() -> None:
    labels = _toy_labels()
    parts = dir_balance(labels, 10, 0.1, seed=3)
    joined = np.concatenate(parts)
    assert joined.size == labels.size and np.unique(joined).size == labels.size
    assert all((np.diff(part) > 0).all() for part in parts)  # sorted
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 1


def test_same_seed_same_split_different_seed_different_split() -> None:
    labels = _toy_labels()
    a, b = dir_balance(labels, 10, 0.1, seed=1), dir_balance(labels, 10, 0.1, seed=1)
    c = dir_balance(labels, 10, 0.1, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    totals = np.bincount(labels)
    m1 = dir_balance_counts(totals, 10, 0.1, np.random.default_rng(1))
    assert np.array_equal(m1, dir_balance_counts(totals, 10, 0.1, np.random.default_rng(1)))
    assert not np.array_equal(m1, dir_balance_counts(totals, 10, 0.1, np.random.default_rng(2)))


def test_no_global_rng_is_touched() -> None:
    state = np.random.get_state()[1].copy()
    import torch

    torch_state = torch.get_rng_state().clone()
    dir_balance(_toy_labels(), 10, 0.1, seed=0)
    assert np.array_equal(np.random.get_state()[1], state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_small_beta_skews_label_mixes_large_beta_follows_the_global_mix() -> None:
    labels = _toy_labels()
    totals = np.bincount(labels)
    global_mix = totals / totals.sum()

    def spread(beta: float) -> float:
        counts = dir_balance_counts(totals, 10, beta, np.random.default_rng(0))
        mixes = counts / counts.sum(axis=1, keepdims=True)
        return float(np.abs(mixes - global_mix).sum(axis=1).mean())

    assert spread(0.1) > 0.5 > 0.1 > spread(100.0)


def test_dispatch_from_partition_indices_and_the_run_config() -> None:
    labels = _toy_labels()
    via_data = partition_indices(labels, "dir-balance", 10, 0.1, 4)
    direct = dir_balance(labels, 10, 0.1, 4)
    assert all(np.array_equal(x, y) for x, y in zip(via_data, direct, strict=True))
    assert resolve({"partition": "dir-balance", "dirichlet-alpha": 0.1}).partition == "dir-balance"
    with pytest.raises(ValueError, match="dirichlet-alpha"):
        partition_indices(labels, "dir-balance", 10, 0.0, 4)
