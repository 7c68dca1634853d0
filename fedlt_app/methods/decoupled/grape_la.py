"""GRAPE-LA: RedGrape with logit adjustment by the class prior (fedlt's own method).

Not a published method: fedlt's extension of RedGrape (README, "fedlt's own
method: GRAPE-LA", gives the reasoning and the ablation). It keeps all of
RedGrape — the two-head local loss, the prototype-based re-balancing of W
(``rebalance-lambda``, ``rebalance-step``, ``balance-threshold``) and the
server's prototype store — and adds the logit adjustment of Menon et al.
(ICLR 2021) to the training logits::

    loss = CE(Wᵀh + Ŵᵀh + τ·log π, y)        inference: argmax Wᵀh (unchanged)

Why. Instance-balanced cross-entropy learns p(y|x) ∝ p(x|y)·π(y): with the
training prior π long-tailed, a rare class must beat a frequent look-alike
by the log of their count ratio. Adding τ·log π to the training logits makes
the softmax absorb the prior, so the network's own logits estimate
p(x|y) — the Bayes classifier for the *balanced* error the tables report.
RedGrape's re-balancing corrects W one step at a time from a balanced set
and the prototypes; the adjustment removes the prior from every training
step's target instead. And with the two-head loss, W and Ŵ receive identical
gradients (the loss sees only their sum), so W − Ŵ moves only by the
re-balancing steps: the head-bias RedGrape wants Ŵ to absorb goes into W
just the same. The prior term is what actually keeps it out.

Which prior (``grape-la-prior``):

* ``global`` (default): π = the federation's class distribution. Clients
  report their class counts; the server sums each round's reports (a sum, so
  secure aggregation can carry it) and broadcasts the normalised running
  total. Summed over clients, the local losses are the centralised
  logit-adjusted loss on all the data, whose minimiser is the balanced
  classifier. Before the first prior arrives (round 1) a client uses its
  own counts.
* ``local``: π = the client's own label distribution (a balanced softmax per
  client). A class the client lacks gets log 0 = −∞: it leaves the client's
  softmax, so the client never pushes down the logit of a class it has not
  seen (the drift FedRS and FedLC address).

``grape-la-tau`` = 0 is RedGrape exactly (a test holds it to that).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.methods.base import Payload, SumSpec
from fedlt_app.methods.class_prior import (
    COUNTS_KEY,
    PRIOR_KEY,
    FederationCounts,
    adjusted_loss,
    counts_report,
    label_counts,
    log_prior_adjustment,
    training_prior,
)
from fedlt_app.methods.decoupled.redgrape import RedGrapeClient, RedGrapeServer, two_head_logits
from fedlt_app.models import EncoderClassifier

__all__ = ["COUNTS_KEY", "PRIOR_KEY", "GrapeLAClient", "GrapeLAServer", "adjusted_loss", "log_prior_adjustment"]


class GrapeLAClient(RedGrapeClient):
    """RedGrape's client with the prior-adjusted two-head loss; reports its class counts."""

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        super().begin(model, images, labels, generator)
        self._counts = label_counts(labels, self.num_classes)
        prior = training_prior(self.payload, self._counts, self.cfg.grape_la_prior)
        self._adjustment = log_prior_adjustment(prior, self.cfg.grape_la_tau).to(next(model.parameters()).device)

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        return adjusted_loss(two_head_logits(model, x), y, self._adjustment)

    def report(self) -> Payload:
        return {**super().report(), **counts_report(self._counts)}

    def summands(self) -> Payload:
        return {**super().summands(), **counts_report(self._counts)}


class GrapeLAServer(RedGrapeServer):
    """RedGrape's prototype store plus the federation's prior (``class_prior.FederationCounts``)."""

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        self.prior = FederationCounts(self.num_classes)

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        payload = super().broadcast(server_round, global_model)
        if self.cfg.grape_la_prior == "global":
            payload.update(self.prior.prior_payload())
        return payload

    def summands_of(self, report: Payload) -> Payload:
        return {**super().summands_of(report), COUNTS_KEY: np.asarray(report[COUNTS_KEY], dtype=np.int64)}

    def sum_segments(self) -> dict[str, SumSpec]:
        """RedGrape's, plus the cohort's class counts (exact)."""
        return {**super().sum_segments(), **self.prior.sum_segments()}

    def absorb_sums(self, server_round: int, sums: Payload) -> None:
        """Prototypes as RedGrape; class counts added to the federation's running total."""
        super().absorb_sums(server_round, sums)
        self.prior.add_sums(sums)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {**super().state_dict(), **self.prior.state_dict()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        super().load_state_dict(state)
        self.prior.load_state_dict(state)
