"""The one local-training loop every method shares.

Readable top to bottom: fresh SGD(M) each round, zero -> loss -> backward ->
method hook -> clip -> step -> method hook.  Methods change the loss or add
work around the step through ``ClientMethod`` hooks; nothing here knows which
method is running.  The hooks' forward passes run under the run's autocast
(``precision``); weights, optimizer state and gradients stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedlt_app.config import RunConfig
from fedlt_app.data import augment
from fedlt_app.methods import ClientMethod
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import precision_for


@dataclass(frozen=True)
class LocalTraining:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    grad_clip: float
    prox_mu: float
    dataset: str
    precision: str = "fp32"

    @classmethod
    def from_config(cls, cfg: RunConfig) -> LocalTraining:
        """The local training a run's config asks for (the app and the plain-loop benchmark must agree)."""
        return cls(cfg.local_epochs, cfg.batch_size, cfg.local_lr, cfg.momentum, cfg.grad_clip, cfg.prox_mu,
                   cfg.dataset, cfg.precision)


@dataclass(frozen=True)
class TrainStats:
    num_examples: int
    steps: int
    mean_loss: float


def proximal_term(params: list[Tensor], anchor: list[Tensor]) -> Tensor:
    """FedProx's ½‖θ − θ_global‖², summed over every trainable tensor."""
    return 0.5 * sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))


def train_locally(
    model: EncoderClassifier,
    images: Tensor,
    labels: Tensor,
    method: ClientMethod,
    setup: LocalTraining,
    generator: torch.Generator,
) -> TrainStats:
    """Train ``model`` in place on one client's data; returns loss statistics.

    ``images`` are the client's uint8 images (augmented per batch, on the
    model's device); ``generator`` drives shuffling and augmentation so a
    (seed, round, client) triple always replays the same steps.
    """
    device = next(model.parameters()).device
    precision = precision_for(setup.precision, device)
    scaler = precision.grad_scaler()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=setup.lr, momentum=setup.momentum)
    anchor = [p.detach().clone() for p in params] if setup.prox_mu > 0 else []
    with precision.autocast():
        method.begin(model, images, labels, generator)
    model.train()
    total_loss, steps = 0.0, 0
    for _ in range(setup.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(setup.batch_size):
            x = augment(images[batch].to(device, non_blocking=True), setup.dataset, generator)
            y = labels[batch].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                loss = method.loss(model, x, y)
            if anchor:
                loss = loss + setup.prox_mu * proximal_term(params, anchor)
            finite = True
            if scaler is None:
                loss.backward()
            else:  # fp16: scaled backward, true gradients before anything reads them
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                finite = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
            if finite:  # a step the scaler skips is skipped by the method too
                with precision.autocast():
                    method.before_step(model)
            if setup.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, setup.grad_clip)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            if finite:
                method.after_step(model)
            total_loss += float(loss.detach())
            steps += 1
    return TrainStats(num_examples=len(labels), steps=steps, mean_loss=total_loss / max(steps, 1))
