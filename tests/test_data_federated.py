"""The federated view: each client's share, exact cover, and per-process caching."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlt_app.data import load_federated_data, longtail_counts

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt package dataset-fashion-mnist not installed")
ARGS = {
    "dataset": "fmnist",
    "data_dir": None,
    "imbalance_profile": "exp",
    "imbalance_ratio": 100.0,
    "minority_classes": (0, 7, 8),
    "partition": "dirichlet",
    "dirichlet_alpha": 1.0,
    "num_clients": 10,
    "seed": 0,
}


@pytest.mark.parametrize("partition", ["dirichlet", "dirichlet-per-class", "iid"])
def test_clients_cover_the_long_tailed_set_once(partition: str) -> None:
    fed = load_federated_data(**{**ARGS, "partition": partition})
    assert fed.num_classes == 10 and fed.num_clients == 10
    assert list(fed.class_counts) == longtail_counts([6000] * 10, "exp", 100)
    assert fed.train_indices.size == sum(fed.class_counts)
    merged = np.concatenate(fed.client_indices)
    assert np.array_equal(np.sort(merged), fed.train_indices)

    labels = []
    for pid in range(fed.num_clients):
        images, client_labels = fed.client_data(pid)
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
        assert client_labels.dtype == torch.int64 and len(client_labels) == len(images)
        assert torch.equal(images, fed.dataset.train_images[torch.tensor(fed.client_indices[pid])])
        labels.append(client_labels)
    assert np.bincount(torch.cat(labels).numpy(), minlength=10).tolist() == list(fed.class_counts)


def test_quota_sizes_and_step_profile() -> None:
    fed = load_federated_data(**{**ARGS, "imbalance_profile": "step", "imbalance_ratio": 10.0})
    assert fed.class_counts == (600, 6000, 6000, 6000, 6000, 6000, 6000, 600, 600, 6000)
    quota = sum(fed.class_counts) // 10
    assert [len(c) for c in fed.client_indices[:-1]] == [quota] * 9


def _digest(fed: object) -> str:
    digest = hashlib.sha256()
    for part in fed.client_indices:  # type: ignore[attr-defined]
        digest.update(np.ascontiguousarray(part).tobytes() + b"|")
    return digest.hexdigest()


def test_same_arguments_same_object_and_arrays() -> None:
    first = load_federated_data(**ARGS)
    # Normalised before the cache: int vs float ratio and list vs tuple still hit it.
    assert load_federated_data(**{**ARGS, "imbalance_ratio": 100, "minority_classes": [0, 7, 8]}) is first
    other = load_federated_data(**{**ARGS, "seed": 1})
    assert not np.array_equal(other.train_indices, first.train_indices)


def test_same_client_data_in_another_process() -> None:
    """What a fresh Ray worker computes must match this process, sample for sample."""
    script = (
        "import hashlib, numpy as np\n"
        "from fedlt_app.data import load_federated_data\n"
        f"fed = load_federated_data(**{ARGS!r})\n"
        "digest = hashlib.sha256()\n"
        "for part in fed.client_indices:\n"
        "    digest.update(np.ascontiguousarray(part).tobytes() + b'|')\n"
        "print(digest.hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.stdout.strip() == _digest(load_federated_data(**ARGS))


def test_shared_arrays_are_read_only() -> None:
    fed = load_federated_data(**ARGS)
    with pytest.raises(ValueError):
        fed.client_indices[0][0] = 0
    images, _ = fed.client_data(0)
    images.zero_()  # a client's copy; the shared data set is untouched
    assert fed.client_data(0)[0].any()


def test_test_set_is_balanced_and_full() -> None:
    images, labels = load_federated_data(**ARGS).test_data()
    assert images.shape == (10000, 1, 28, 28)
    assert np.bincount(labels.numpy()).tolist() == [1000] * 10


@pytest.mark.parametrize("bad", [-1, 10, 99])
def test_partition_id_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="partition-id"):
        load_federated_data(**ARGS).client_data(bad)
