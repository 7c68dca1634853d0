"""Build the federation's data once per process and hand each client its share.

In simulation one Ray worker hosts many virtual clients; caching the decoded,
long-tailed and partitioned data here means each worker pays for it once, and
because everything is derived from the seed, every process agrees on which
samples client k holds without any coordination.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .image_dataset import ImageDataset
from .longtail import longtail_counts, longtail_indices
from .partition import WRITER_PARTITION, partition_indices, partition_writers
from .sources import load_dataset


@dataclass(frozen=True, eq=False)
class FederatedData:
    """The long-tailed training set split over clients, plus the balanced test set.

    Indices are kept instead of copies so that all clients in a process share
    one decoded data set. ``eq=False``: equality of numpy arrays is not a bool.
    """

    dataset: ImageDataset
    train_indices: np.ndarray  # long-tailed training set, into dataset.train_*
    class_counts: tuple[int, ...]  # per class, of the long-tailed training set
    client_indices: tuple[np.ndarray, ...]  # per client, into dataset.train_*
    test_indices: np.ndarray | None = None  # a balanced test subset, or None for the full split

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    def client_data(self, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, int64 labels) of one client, as fresh tensors it may modify."""
        if not 0 <= int(partition_id) < self.num_clients:
            raise ValueError(f"partition-id: {partition_id!r} is out of range; allowed are 0..{self.num_clients - 1}")
        index = torch.tensor(self.client_indices[int(partition_id)])  # copy: the array is read-only
        return self.dataset.train_images[index], self.dataset.train_labels[index]

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The balanced test split (shared with every caller when full, so read-only)."""
        if self.test_indices is None:
            return self.dataset.test_images, self.dataset.test_labels
        index = torch.from_numpy(self.test_indices.copy())
        return self.dataset.test_images[index], self.dataset.test_labels[index]


def first_per_class(labels: np.ndarray, limit: int) -> np.ndarray:
    """Sorted indices of the first ``limit`` samples of every class."""
    keep = [np.flatnonzero(labels == c)[:limit] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)).astype(np.int64)


# Data sets whose clients are given by the data (their writers), and whose long
# tail is natural: no long-tail cut, and only the "writers" partition.
NATURAL_CLIENT_DATASETS = ("femnist",)


def check_partition(dataset: str, partition: str) -> None:
    """Refuse a partition scheme that does not fit the data set (each way round)."""
    if dataset in NATURAL_CLIENT_DATASETS and partition != WRITER_PARTITION:
        raise ValueError(
            f"partition: dataset {dataset!r} has natural clients (its writers) and a natural long tail; "
            f"use partition {WRITER_PARTITION!r} (got {partition!r})"
        )
    if partition == WRITER_PARTITION and dataset not in NATURAL_CLIENT_DATASETS:
        raise ValueError(
            f"partition: {WRITER_PARTITION!r} needs per-sample writer ids, which only dataset(s) "
            f"{', '.join(NATURAL_CLIENT_DATASETS)} have (got dataset {dataset!r})"
        )


def load_federated_data(
    dataset: str,
    data_dir: str | os.PathLike[str] | None,
    imbalance_profile: str,
    imbalance_ratio: float,
    minority_classes: Sequence[int],
    partition: str,
    dirichlet_alpha: float,
    num_clients: int,
    seed: int,
    samples_per_class: int = 0,
) -> FederatedData:
    """Load, long-tail and partition a data set; cached per process.

    ``samples_per_class`` > 0 first keeps only that many training and test
    samples of each class (a quick subset whose test set stays balanced).
    Arguments are normalised before the cache lookup, so e.g. a list of
    minority classes or IR 100 vs 100.0 still hit the same cache entry.

    FEMNIST (partition "writers") keeps its natural long tail: no cut, so
    ``class_counts`` are the natural counts and the imbalance arguments are
    ignored; its clients are its writers (see :func:`partition_writers`).
    """
    dataset = str(dataset).strip().lower()
    check_partition(dataset, str(partition))
    return _build(
        dataset,
        str(data_dir) if data_dir else "",
        str(imbalance_profile),
        float(imbalance_ratio),
        tuple(int(c) for c in minority_classes),
        str(partition),
        float(dirichlet_alpha),
        int(num_clients),
        int(seed),
        int(samples_per_class),
    )


@functools.lru_cache(maxsize=4)
def _build(
    dataset: str,
    data_dir: str,
    imbalance_profile: str,
    imbalance_ratio: float,
    minority_classes: tuple[int, ...],
    partition: str,
    dirichlet_alpha: float,
    num_clients: int,
    seed: int,
    samples_per_class: int,
) -> FederatedData:
    data = load_dataset(dataset, data_dir or None)
    labels = data.train_labels.numpy()
    pool = np.arange(len(labels)) if samples_per_class <= 0 else first_per_class(labels, samples_per_class)
    original = np.bincount(labels[pool], minlength=data.num_classes)
    test_indices = None
    if samples_per_class > 0:
        test_indices = first_per_class(data.test_labels.numpy(), samples_per_class)
    if partition == WRITER_PARTITION:
        if data.train_writers is None:
            raise ValueError(f"partition: {WRITER_PARTITION!r} needs writer ids, which data set {dataset!r} lacks")
        counts = original.tolist()  # the natural long tail: nothing is cut
        train_indices = pool.astype(np.int64)
        parts = partition_writers(data.train_writers.numpy()[train_indices], num_clients)
    else:
        counts = longtail_counts(original.tolist(), imbalance_profile, imbalance_ratio, minority_classes)
        train_indices = pool[longtail_indices(labels[pool], counts, np.random.default_rng(seed))]
        parts = partition_indices(labels[train_indices], partition, num_clients, dirichlet_alpha, seed)
    client_indices = tuple(train_indices[part] for part in parts)
    # Every caller in the process shares these arrays through the cache.
    for array in (train_indices, *client_indices):
        array.setflags(write=False)
    return FederatedData(
        dataset=data,
        train_indices=train_indices,
        class_counts=tuple(counts),
        client_indices=client_indices,
        test_indices=test_indices,
    )
