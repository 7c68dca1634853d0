"""Personalised accuracy: a client's own network tested on data distributed like its own.

FedETF, FedNH and FedLoGe report, beside the global model's accuracy on the
balanced test set, each client's personalised model tested on a test set that
follows that client's training label distribution, averaged over clients.
Here that test set is the balanced test split re-weighted to the client's
label distribution p (p_c = n_c / n from its training counts):

    personalised accuracy = Σ_c p_c · acc_c

with acc_c the personal model's accuracy on the test samples of class c. It
is what a test set drawn from the test split to p measures in expectation,
without that draw's sampling noise or a size to choose, and every client is
tested on the same images. Only the classes the client holds are evaluated
(the others weigh 0), which keeps the per-client cost to its classes' share
of the test split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fedlt_app.metrics import evaluate
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import FP32, Precision


def label_distribution(labels: Tensor, num_classes: int) -> np.ndarray:
    """p_c = n_c / n of a client's training labels (float64, sums to 1)."""
    counts = np.bincount(labels.cpu().numpy().astype(np.int64), minlength=num_classes).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def personalised_accuracy(model: EncoderClassifier, test_images: Tensor, test_labels: Tensor,
                          distribution: np.ndarray, dataset: str, precision: Precision = FP32) -> float:
    """Σ_c p_c · (accuracy of ``model`` on the test samples of class c), over the classes with p_c > 0."""
    held = np.flatnonzero(distribution > 0)
    if len(held) == 0:
        return float("nan")
    mask = np.isin(test_labels.cpu().numpy(), held)
    if not mask.any():
        raise ValueError("personalised accuracy: the test split has no sample of the client's classes")
    index = torch.from_numpy(np.flatnonzero(mask))
    result = evaluate(model, test_images[index], test_labels[index], dataset, tail_classes=[],
                      class_counts=[0] * model.num_classes, precision=precision)
    per_class = np.asarray(result.per_class_accuracy, dtype=np.float64)
    present = np.bincount(test_labels[index].cpu().numpy(), minlength=model.num_classes) > 0
    weights = np.where(present, distribution, 0.0)  # a held class missing from the test split cannot count
    return float((weights * per_class).sum() / weights.sum())
