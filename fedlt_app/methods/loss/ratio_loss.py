"""Ratio Loss (Wang et al., AAAI 2021): a server-side monitor of class imbalance.

Each round the server takes the global model one SGD step on each class's 32
auxiliary samples (kept aside before the long-tail cut) and looks at how the
final classifier's weights move.  Weight entries where one class's step
clearly dominates (no other class within 80% of the largest change) are the
ones that class "owns"; the ratio of that class's change to the mean change of
the others on those entries measures how under-represented it is.  Clients
then weight their cross-entropy by α_c = 1 + 0.1·ratio_c (ratio capped at
5000).  Round 1 uses uniform weights, as in the original code.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData, augment
from fedlt_app.methods.base import ClientMethod, Payload, ServerMethod
from fedlt_app.models import EncoderClassifier

RATIO_CAP = 5000.0
DOMINANCE = 0.8


def dominant_entries(deltas: np.ndarray) -> np.ndarray:
    """mask[p, i, j]: class p's step has the largest change of entry (i, j), and no
    other class's |change| is within 80% of it."""
    winner = deltas.argmax(axis=0)
    top = np.take_along_axis(deltas, winner[None], axis=0)[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        close = np.where(top == 0, deltas == 0, np.abs(deltas) / np.abs(top) > DOMINANCE)
    unique = close.sum(axis=0) < 2
    mask = np.zeros(deltas.shape, dtype=bool)
    np.put_along_axis(mask, winner[None], unique[None], axis=0)
    return mask


def ratio_loss_weights(deltas: np.ndarray, alpha: float = 1.0, beta: float = 0.1) -> np.ndarray:
    """Class weights α + β·ratio_c from per-class classifier-weight changes (P, C, d)."""
    mask = dominant_entries(deltas)
    num = len(deltas)
    others_mean = (deltas.sum(axis=0)[None] - deltas) / (num - 1)
    ratios = np.empty(num)
    for c in range(num):
        own, others = deltas[c][mask[c]].sum(), others_mean[c][mask[c]].sum()
        ratios[c] = abs(own) / abs(others) if others != 0 else 10.0
    return alpha + beta * np.minimum(ratios, RATIO_CAP)


def auxiliary_indices(labels: np.ndarray, per_class: int) -> list[np.ndarray]:
    """The first ``per_class`` training samples of each class, in the original order."""
    return [np.flatnonzero(labels == c)[:per_class] for c in range(int(labels.max()) + 1)]


class RatioLossServer(ServerMethod):
    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        images, labels = data.dataset.train_images, data.dataset.train_labels
        chosen = auxiliary_indices(labels.numpy(), cfg.ratio_aux_per_class)
        self.auxiliary = [(images[idx], labels[idx]) for idx in chosen]
        self.weights = np.ones(self.num_classes, dtype=np.float32)

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        if server_round == 1:
            return {}
        self.weights = ratio_loss_weights(self.classifier_steps(global_model, server_round)).astype(np.float32)
        return {"class-weights": self.weights}

    def classifier_steps(self, model: EncoderClassifier, server_round: int) -> np.ndarray:
        """W's change after one SGD step on each class's auxiliary batch: −η·∇_W CE."""
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(self.cfg.seed * 7919 + server_round)
        torch.manual_seed(self.cfg.seed * 7919 + server_round)
        was_training = model.training
        model.train()
        steps = []
        for images, labels in self.auxiliary:
            x = augment(images.to(device), self.cfg.dataset, generator, self.cfg.augment)
            with self.precision.autocast():
                logits = model(x)
            loss = F.cross_entropy(logits, labels.to(device))
            (grad,) = torch.autograd.grad(loss, [model.classifier.weight])
            steps.append((-self.cfg.local_lr * grad).cpu().numpy())
        model.train(was_training)
        return np.stack(steps)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.weights = state["weights"]

    def round_metrics(self) -> dict[str, float | int]:
        return {"ratio_weight_max": float(self.weights.max()), "ratio_weight_min": float(self.weights.min())}


class RatioLossClient(ClientMethod):
    """Cross-entropy weighted by the server's class weights α_y."""

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        weights = self.payload.get("class-weights", np.ones(self.num_classes, dtype=np.float32))
        self._weights = torch.from_numpy(np.asarray(weights)).to(next(model.parameters()).device)

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        return (self._weights[y] * F.cross_entropy(model(x), y, reduction="none")).mean()
