"""The one local-training loop every method shares.

Readable top to bottom: fresh SGD(M) each round, shared batch view -> the
method's input -> zero -> loss -> backward -> method hook -> clip -> step ->
method hook (with ``sam-rho``, the loss and backward at weights moved up the
gradient first: ``sharpness_aware_ascent``).  Methods change the loss or add
work around the step through ``ClientMethod`` hooks; nothing here knows which
method is running.  The hooks' forward passes run under the run's autocast
(``precision``); weights, optimizer state and gradients stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from fedlt_app.config import RunConfig
from fedlt_app.data import augment
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import precision_for


class TrainingHooks(Protocol):
    """What the loop calls on a method: ``fedlt_app.methods.base.ClientMethod``'s hooks.

    A protocol rather than an import, so that methods can themselves run this loop (FedETF's personal
    fine-tuning) without an import cycle between the loop and the methods.
    """

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor,
              generator: torch.Generator) -> None: ...

    def batch_input(self, raw: Tensor, augmented: Tensor) -> Tensor: ...

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor: ...

    def before_step(self, model: EncoderClassifier) -> None: ...

    def after_step(self, model: EncoderClassifier) -> None: ...


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
    weight_decay: float = 0.0  # SGD's own L2 term, added to the gradient after clipping (as FedLTLib's optimiser)
    augment: str = "authors"  # the run's augment key (fedlt_app.data.transforms.augment's policy)
    sam_rho: float = 0.0  # sharpness-aware minimisation's radius (0 = plain SGD)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> LocalTraining:
        """The local training a run's config asks for (the app and the plain-loop benchmark must agree)."""
        return cls(cfg.local_epochs, cfg.batch_size, cfg.local_lr, cfg.momentum, cfg.grad_clip, cfg.prox_mu,
                   cfg.dataset, cfg.precision, cfg.weight_decay, cfg.augment, cfg.sam_rho)


@dataclass(frozen=True)
class TrainStats:
    num_examples: int
    steps: int
    mean_loss: float


def proximal_term(params: list[Tensor], anchor: list[Tensor]) -> Tensor:
    """FedProx's ½‖θ − θ_global‖², summed over every trainable tensor."""
    return 0.5 * sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))


METHOD_STREAM = 0x6D657468  # "meth": tags the method stream's seed sequence
HOOK_DROPOUT = 0x64726F70  # "drop": the hooks' global-RNG seed, from the method stream's


def method_stream(generator: torch.Generator) -> torch.Generator:
    """The method's own random stream, derived from (and independent of) the data stream's seed."""
    seed = np.random.SeedSequence([generator.initial_seed(), METHOD_STREAM]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))


def global_rng_state(cuda: int | None) -> tuple[Tensor, Tensor | None]:
    """The global RNG (dropout's) of the CPU and of CUDA device ``cuda`` (None: the CPU's only)."""
    return torch.get_rng_state(), None if cuda is None else torch.cuda.get_rng_state(cuda)


def set_global_rng_state(cuda: int | None, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if cuda is not None and state[1] is not None:
        torch.cuda.set_rng_state(state[1], cuda)


def cuda_index(device: torch.device) -> int | None:
    return (device.index or 0) if device.type == "cuda" else None


def sharpness_aware_ascent(params: list[Tensor], loss: Tensor, rho: float) -> list[Tensor] | None:
    """SAM's first half (Foret et al., ICLR 2021): move ``params`` in place by ε = ρ·g/‖g‖, g = ∇loss, the
    steepest ascent within radius ρ; returns ε to undo the move, or None (nothing moved) when g is not finite
    or zero. ε does not depend on a scale of the loss, so fp16's scaled loss serves as it is."""
    grads = [torch.zeros_like(p) if g is None else g.float()
             for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True), strict=True)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        return None
    moves = [(rho / norm) * g for g in grads]
    with torch.no_grad():
        for p, e in zip(params, moves, strict=True):
            p.add_(e)
    return moves


class HookRNG:
    """A global-RNG stream of the method hooks' own (dropout in their forward passes).

    Swapped in around each hook and out again, so a hook's forward pass in
    training mode (RedGrape's balanced set) never shifts the dropout masks of
    the shared training forward: every method draws the same masks per batch.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.cuda = cuda_index(device)
        with torch.random.fork_rng(devices=[] if self.cuda is None else [self.cuda]):
            torch.manual_seed(seed)
            self.state = global_rng_state(self.cuda)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        loop_state = global_rng_state(self.cuda)
        set_global_rng_state(self.cuda, self.state)
        try:
            yield
        finally:
            self.state = global_rng_state(self.cuda)
            set_global_rng_state(self.cuda, loop_state)


def train_locally(
    model: EncoderClassifier,
    images: Tensor,
    labels: Tensor,
    method: TrainingHooks,
    setup: LocalTraining,
    generator: torch.Generator,
    method_generator: torch.Generator | None = None,
) -> TrainStats:
    """Train ``model`` in place on one client's data; returns loss statistics.

    ``images`` are the client's uint8 images (augmented per batch, on the
    model's device). ``generator`` drives shuffling and augmentation only, so
    a (seed, round, client) triple replays the same steps and *every method
    sees the same batches* (runs of two methods with one seed are paired).
    A method's own draws (balanced sets, its passes' augmentation and
    dropout) come from ``method_generator``, by default derived from
    ``generator``'s seed.
    """
    device = next(model.parameters()).device
    method_generator = method_generator or method_stream(generator)
    hook_rng = HookRNG(method_generator.initial_seed() ^ HOOK_DROPOUT, device)
    precision = precision_for(setup.precision, device)
    scaler = precision.grad_scaler()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=setup.lr, momentum=setup.momentum, weight_decay=setup.weight_decay)
    anchor = [p.detach().clone() for p in params] if setup.prox_mu > 0 else []
    cuda = cuda_index(device)

    def batch_loss(x: Tensor, y: Tensor) -> Tensor:
        with precision.autocast():
            loss = method.loss(model, x, y)
        return loss + setup.prox_mu * proximal_term(params, anchor) if anchor else loss

    with precision.autocast(), hook_rng.active():
        method.begin(model, images, labels, method_generator)
    model.train()
    total_loss, steps = 0.0, 0
    for _ in range(setup.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(setup.batch_size):
            raw = images[batch].to(device, non_blocking=True)
            x = augment(raw, setup.dataset, generator, setup.augment)
            with hook_rng.active():  # the shared view, or more views of these images (FedYoYo's strong one)
                x = method.batch_input(raw, x)
            y = labels[batch].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            moves = None
            if setup.sam_rho > 0:  # the gradient is taken at w + ε, with this batch's dropout masks again
                masks = global_rng_state(cuda)
                loss_at_w = batch_loss(x, y)
                moves = sharpness_aware_ascent(params, loss_at_w, setup.sam_rho)
                set_global_rng_state(cuda, masks)
            loss = batch_loss(x, y)
            finite = True
            if scaler is None:
                loss.backward()
            else:  # fp16: scaled backward, true gradients before anything reads them
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                finite = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
            if moves is not None:  # back to w: the step (and the method's hooks) start from the weights
                with torch.no_grad():
                    for p, e in zip(params, moves, strict=True):
                        p.sub_(e)
                loss = loss_at_w  # the loss the step lowers is reported at w, as without SAM
            if finite:  # a step the scaler skips is skipped by the method too
                with precision.autocast(), hook_rng.active():
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
