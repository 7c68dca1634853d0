"""FairFAL's local-only model: trained from scratch on one client's labeled set.

``training_local_only`` (query_strategies/strategy.py l.242-298): from the
initial random weights (not the global model), SGD with the client lr,
momentum and weight decay 1e-5, batch 64, up to 50 epochs on the augmented
labeled set; a ``MultiStepLR`` at milestone ⌊0.75·50⌋ = 37 with γ 0.1 that the
code steps once per *mini-batch* (so the lr drops after 37 optimizer steps;
``milestone_unit="epoch"`` gives the evidently intended per-epoch schedule);
after each epoch, stop once the accuracy on the augmented labeled set (eval
mode) reaches 0.99.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from fedlt_app.data import augment
from fedlt_app.models import EncoderClassifier

WEIGHT_DECAY = 1e-5  # util/args.py
LR_DECAY = 0.1


@dataclass(frozen=True)
class LocalOnlySetup:
    epochs: int = 50
    milestone: int = 37
    milestone_unit: str = "batch"  # "batch" (the code) or "epoch"
    early_stop: float = 0.99
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    dataset: str = "fmnist"
    augment: str = "authors"  # the run's augment key


@dataclass(frozen=True)
class LocalOnlyStats:
    epochs: int
    steps: int
    train_accuracy: float


def train_local_only(
    model: EncoderClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    setup: LocalOnlySetup,
    generator: torch.Generator,
) -> LocalOnlyStats:
    """Train ``model`` (already holding the initial weights) in place."""
    device = next(model.parameters()).device
    optimizer = torch.optim.SGD(model.parameters(), lr=setup.lr, momentum=setup.momentum, weight_decay=WEIGHT_DECAY)
    steps, accuracy, epoch = 0, 0.0, 0
    for epoch in range(1, setup.epochs + 1):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(setup.batch_size):
            x = augment(images[batch].to(device), setup.dataset, generator, setup.augment)
            loss = F.cross_entropy(model(x), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if setup.milestone_unit == "batch" and steps == setup.milestone:
                _decay(optimizer)
        if setup.milestone_unit == "epoch" and epoch == setup.milestone:
            _decay(optimizer)
        accuracy = _accuracy(model, images, labels, setup, generator)
        if accuracy >= setup.early_stop:
            break
    model.eval()
    return LocalOnlyStats(epochs=epoch, steps=steps, train_accuracy=accuracy)


def _decay(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        group["lr"] *= LR_DECAY


@torch.no_grad()
def _accuracy(
    model: EncoderClassifier, images: torch.Tensor, labels: torch.Tensor, setup: LocalOnlySetup,
    generator: torch.Generator,
) -> float:
    """Accuracy on the augmented labeled set in eval mode, as the code measures it."""
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for start in range(0, len(labels), 256):
        x = augment(images[start : start + 256].to(device), setup.dataset, generator, setup.augment)
        correct += int((model(x).argmax(dim=1).cpu() == labels[start : start + 256]).sum())
    return correct / max(len(labels), 1)
