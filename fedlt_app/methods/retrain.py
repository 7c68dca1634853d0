"""Re-training a linear classifier on server-side feature vectors (CReFF, CCVR).

Both methods end their server step the same way: a linear head is trained by
plain mini-batch SGD with cross-entropy on (feature, label) pairs the server
holds — CReFF's federated features, CCVR's virtual representations. Only the
start point, the learning rate, momentum, weight decay, batch size and epoch
count differ, so they are arguments here and the loop lives once.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import Precision


def retrain_linear(
    classifier: nn.Linear,
    features: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    precision: Precision,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> float:
    """Train ``classifier`` in place; returns the mean loss of the last epoch.

    Each epoch visits the pairs in one ``torch.randperm`` order drawn from
    ``generator`` (so the caller's stream fixes the batches), in batches of
    ``batch_size`` (the last one smaller). Autocast wraps each forward only:
    the weights change between steps, and a context held across steps would
    keep serving their stale low-precision copies.
    """
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    features, last_epoch_loss = features.detach(), float("nan")
    for _ in range(epochs):
        total, seen = torch.zeros((), device=features.device), 0
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                logits = classifier(features[batch]).float()
            loss = F.cross_entropy(logits, labels[batch])
            loss.backward()
            optimizer.step()
            total, seen = total + loss.detach() * len(batch), seen + len(batch)
        last_epoch_loss = float(total) / max(seen, 1)
    return last_epoch_loss


def with_classifier(global_model: EncoderClassifier, classifier: nn.Module | None) -> EncoderClassifier:
    """What a re-training method evaluates: the global model itself (no classifier re-trained for it), or a
    copy with the re-trained classifier's weights; the global model that keeps training is never touched."""
    if classifier is None:
        return global_model
    evaluated = copy.deepcopy(global_model)
    evaluated.classifier.load_state_dict(classifier.state_dict())
    return evaluated
