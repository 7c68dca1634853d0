"""Data for federated long-tailed learning: load, long-tail, partition, transform.

Everything here is plain numpy/torch (flwr-datasets only for one partition
scheme), so the same code serves simulation, deployment and tests.
"""

from .federated import FederatedData, load_federated_data
from .longtail import IMBALANCE_PROFILES, longtail_counts, longtail_indices, tail_classes
from .partition import PARTITIONS, partition_indices, sample_dirichlet
from .sources import DATASETS, DatasetNotFoundError, ImageDataset, load_dataset
from .transforms import augment, to_float

__all__ = [
    "DATASETS",
    "IMBALANCE_PROFILES",
    "PARTITIONS",
    "DatasetNotFoundError",
    "FederatedData",
    "ImageDataset",
    "augment",
    "load_dataset",
    "load_federated_data",
    "longtail_counts",
    "longtail_indices",
    "partition_indices",
    "sample_dirichlet",
    "tail_classes",
    "to_float",
]
