"""A client's partition under active learning: every image, but labels only where labeled.

The query code receives a :class:`ClientPool` and nothing else of the data.
Its labels can be read in two ways only: those of the current labeled set
(:meth:`ClientPool.labeled_labels`) and, once a query has chosen them, those
of the newly selected samples (:meth:`ClientPool.reveal`, the oracle). The
unlabeled pool exposes images. Tests hand in a label container that raises on
any other read (see tests/test_active_hygiene.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def as_positions(values: Any) -> np.ndarray:
    """Sorted, unique int64 positions."""
    return np.unique(np.asarray(values, dtype=np.int64))


class ClientPool:
    """Images of a client's whole partition, with its labeled positions.

    ``labels`` may be any container indexable by an int64 numpy array (a
    tensor in the app, a guard in tests); it is indexed with labeled
    positions only.
    """

    def __init__(self, images: Tensor, labels: Any, labeled: Any) -> None:
        self.images = images
        self._labels = labels
        self.labeled = as_positions(labeled)
        if self.labeled.size and (self.labeled[0] < 0 or self.labeled[-1] >= len(images)):
            raise ValueError(f"labeled positions must lie in 0..{len(images) - 1}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def unlabeled(self) -> np.ndarray:
        """Positions of the unlabeled pool, sorted."""
        return np.setdiff1d(np.arange(len(self.images), dtype=np.int64), self.labeled, assume_unique=True)

    def labeled_labels(self) -> Tensor:
        """Labels of the labeled set, in the order of :attr:`labeled`."""
        return torch.as_tensor(self._labels[self.labeled], dtype=torch.long)

    def labeled_data(self) -> tuple[Tensor, Tensor]:
        """(images, labels) of the labeled set."""
        return self.images[torch.from_numpy(self.labeled)], self.labeled_labels()

    def reveal(self, positions: Any) -> Tensor:
        """The oracle: label ``positions`` (unlabeled ones), returning their labels."""
        new = as_positions(positions)
        if new.size != np.asarray(positions).size:
            raise ValueError("a query selected the same sample twice")
        if new.size and (new[0] < 0 or new[-1] >= len(self.images)):
            raise ValueError(f"selected positions must lie in 0..{len(self.images) - 1}")
        if np.intersect1d(new, self.labeled).size:
            raise ValueError("a query selected samples that are already labeled")
        self.labeled = np.union1d(self.labeled, new)
        return torch.as_tensor(self._labels[new], dtype=torch.long)
