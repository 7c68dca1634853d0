"""Data for federated long-tailed learning: load, long-tail, partition, transform.

Everything here is plain numpy/torch (flwr-datasets only for one partition
scheme, Hugging Face `datasets` only for FEMNIST's hub fallback), so the same
code serves simulation, deployment and tests.
"""

from .federated import NATURAL_CLIENT_DATASETS, FederatedData, load_federated_data
from .femnist import load_femnist
from .image_dataset import DatasetNotFoundError, ImageDataset
from .longtail import IMBALANCE_PROFILES, longtail_counts, longtail_indices, tail_classes
from .partition import PARTITIONS, WRITER_PARTITION, partition_indices, partition_writers, sample_dirichlet
from .sources import DATASETS, load_dataset
from .transforms import augment, to_float

__all__ = [
    "DATASETS",
    "IMBALANCE_PROFILES",
    "NATURAL_CLIENT_DATASETS",
    "PARTITIONS",
    "WRITER_PARTITION",
    "DatasetNotFoundError",
    "FederatedData",
    "ImageDataset",
    "augment",
    "load_dataset",
    "load_federated_data",
    "load_femnist",
    "longtail_counts",
    "longtail_indices",
    "partition_indices",
    "partition_writers",
    "sample_dirichlet",
    "tail_classes",
    "to_float",
]
