"""What every loader returns: a decoded image data set, or the error that it is missing.

Below the loaders (:mod:`.sources`, :mod:`.femnist`) so that each can use
them without importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are in none of the places we search.

    A subclass of FileNotFoundError so generic handlers still work, but a
    distinct type so callers (and tests) can tell "data missing" from other
    I/O failures.
    """


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A decoded data set, kept as uint8 so that it stays small in memory.

    Tensors are shared by every caller (the loader caches them per process):
    treat them as read-only. ``eq=False`` keeps identity semantics, since an
    element-wise tensor comparison has no meaning as dataclass equality.
    """

    name: str
    num_classes: int
    train_images: torch.Tensor  # uint8, (N, C, H, W), contiguous
    train_labels: torch.Tensor  # int64, (N,)
    test_images: torch.Tensor  # uint8, (M, C, H, W), contiguous
    test_labels: torch.Tensor  # int64, (M,)
    # int64, (N,): index of each training sample's writer in the sorted list of
    # writer names, for data sets with natural clients (FEMNIST); else None.
    train_writers: torch.Tensor | None = None
