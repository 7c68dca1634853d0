"""What a method is: a few hooks in the shared local loop and a server part.

Methods never see Flower: they exchange plain ``dict[str, np.ndarray]``
payloads, which the client and server apps turn into ArrayRecords. Adding a
method means writing these hooks, never another training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import precision_for

Payload = dict[str, np.ndarray]


class ClientMethod:
    """Plain instance-balanced cross-entropy training (FedAvg+CE).

    Subclasses change the loss or add work around the optimizer step; the
    loop that calls these hooks lives in ``fedlt_app.train``.
    """

    def __init__(self, cfg: RunConfig, num_classes: int, payload: Payload) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.payload = payload

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        """Run once on the received model before the first local step.

        ``generator`` is the method's own stream (not the batches'), and the
        global RNG (dropout) is the hooks' own too, so what a method draws here
        or in ``before_step`` never changes the batches every method shares.
        This and ``before_step`` run under the run's autocast: never step an
        optimizer inside one (autocast would keep serving the weights' stale
        low-precision copies until the hook returns).
        """

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y)

    def before_step(self, model: EncoderClassifier) -> None:
        """Called after backward, before clipping and the optimizer step."""

    def after_step(self, model: EncoderClassifier) -> None:
        """Called after the optimizer step."""

    def report(self) -> Payload:
        """Arrays sent back to the server beside the model."""
        return {}


@dataclass(frozen=True)
class ClientReport:
    """One client's reply as a method's server part sees it."""

    partition_id: int
    num_examples: int
    payload: Payload


class ServerMethod:
    """Server side of a method that needs nothing beyond weighted averaging.

    Hooks run in this order each round: ``broadcast`` (with the global model
    being sent), then, on the replies that succeeded, ``aggregation_weights``
    and ``absorb``; ``evaluation_model`` picks what the server tests.
    """

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        self.cfg = cfg
        self.num_classes = model.num_classes
        # For the method's own forward passes. Wrap each forward, never a loop that steps an optimizer:
        # autocast caches the low-precision copy of a weight until the context exits, so weights updated
        # inside one context would be seen stale by every later forward.
        self.precision = precision_for(cfg.precision, next(model.parameters()).device)

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        """Arrays sent to every sampled client with the global model."""
        return {}

    def aggregation_weights(self, server_round: int, reports: list[ClientReport]) -> list[float] | None:
        """Replace the sample counts as model-averaging weights (None: keep them)."""
        return None

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        """Take this round's client payloads (only replies that succeeded)."""

    def evaluation_model(self, global_model: EncoderClassifier) -> EncoderClassifier:
        """The network the server evaluates, given the new global model."""
        return global_model

    def round_metrics(self) -> dict[str, float | int]:
        """Method state worth a column in metrics.jsonl."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this method's server side."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of ``state_dict``."""


def extend_nothing(model: EncoderClassifier) -> EncoderClassifier:
    return model
