"""Balanced-test-set evaluation: overall, tail and per-class accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.data import to_float
from fedlt_app.models import EncoderClassifier


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    tail_accuracy: float
    per_class_accuracy: list[float]
    loss: float

    def as_dict(self) -> dict[str, float | list[float]]:
        return asdict(self)


@torch.no_grad()
def evaluate(
    model: EncoderClassifier,
    images: Tensor,
    labels: Tensor,
    dataset: str,
    tail_classes: Sequence[int],
    batch_size: int = 256,
) -> Evaluation:
    """Evaluate ``model`` as deployed: ``model(x)`` uses P and W only.

    Tail accuracy pools the test samples of ``tail_classes`` (on a balanced
    test set this equals the mean of their per-class accuracies).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    num_classes = model.num_classes
    correct = torch.zeros(num_classes, dtype=torch.long)
    seen = torch.zeros(num_classes, dtype=torch.long)
    loss_sum = 0.0
    for start in range(0, len(labels), batch_size):
        x = to_float(images[start : start + batch_size].to(device), dataset)
        y = labels[start : start + batch_size].to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        hits = (logits.argmax(dim=1) == y).cpu()
        correct += torch.bincount(y.cpu()[hits], minlength=num_classes)
        seen += torch.bincount(y.cpu(), minlength=num_classes)
    model.train(was_training)
    tail = torch.as_tensor(list(tail_classes), dtype=torch.long)
    per_class = correct.double() / seen.clamp(min=1)
    return Evaluation(
        accuracy=float(correct.sum() / seen.sum()),
        tail_accuracy=float(correct[tail].sum() / seen[tail].sum().clamp(min=1)),
        per_class_accuracy=[float(a) for a in per_class],
        loss=loss_sum / len(labels),
    )
