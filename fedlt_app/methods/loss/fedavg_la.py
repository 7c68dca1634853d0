"""FedAvg-LA: FedAvg with logit adjustment by the federation's class prior (fedlt's own ablation).

Not a published method: GRAPE-LA (``methods/decoupled/grape_la.py``) without RedGrape. One head, no
supplementary classifier, no prototypes, no re-balancing step; each client trains on::

    loss = CE(z + τ·log π, y)        inference: argmax z (unchanged)

with π the federation's class distribution (``fedavg-la-prior=global``: the server sums the clients'
reported class counts and broadcasts the normalised running total, ``class_prior.FederationCounts``; a
client's own counts in round 1) or the client's own (``local``: a balanced softmax per client, classes it
lacks leave its softmax). The server is plain FedAvg.

Why it exists. On the converged protocol GRAPE-LA at λ 0 (its two heads and the adjustment, no
re-balancing) matched RedGrape and GRAPE-LA to a fraction of a point, which says the adjustment by the
federation's prior does the work. This method is that claim's test: if it matches them, the prior is all
that matters and the two heads and the prototype exchange can go; what is left is what a new method must
beat. Summed over clients, the global-prior losses are the centralised logit-adjusted loss on all the
data, whose minimiser is the balanced classifier; FedLC's local counts give each client a different target
(its n^(−1/4) margins), FedLTLib's FedLC variant a global n^(−1/4) margin rather than log π.

What travels beyond FedAvg: C class counts up (exact integers, so secure aggregation carries them as a
sum) and C prior values down. ``fedavg-la-tau`` = 0 is FedAvg+CE exactly.

``fedavg-la-posthoc=training-recall`` (fedlt's, off by default; FLAT-LA's ``flat-la-posthoc``) adds a
post-hoc adjustment to the evaluated network, z − τ'·log π, with τ' picked every round by the clients'
balanced recall on their own training images (``methods/posthoc.py``): one statistics query per round on
the evaluated network (after the weight averaging), a grid × C matrix of integer counts up per client.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.methods.base import ClientMethod, ClientReport, Payload, ServerMethod, SumSpec
from fedlt_app.methods.class_prior import (
    PRIOR_KEY,
    FederationCounts,
    adjusted_loss,
    counts_report,
    label_counts,
    log_prior_adjustment,
    training_prior,
)
from fedlt_app.methods.features import encoder_features
from fedlt_app.methods.posthoc import (
    HITS_KEY,
    TOTALS_KEY,
    candidate_strengths,
    hits_per_strength,
    pick_strength,
    shifted_network,
)
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import Precision


class FedAvgLAClient(ClientMethod):
    """Logit-adjusted cross-entropy by the prior ``fedavg-la-prior`` names; reports the client's class counts."""

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        self._counts = label_counts(labels, self.num_classes)
        prior = training_prior(self.payload, self._counts, self.cfg.fedavg_la_prior)
        self._adjustment = log_prior_adjustment(prior, self.cfg.fedavg_la_tau).to(next(model.parameters()).device)

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        return adjusted_loss(model(x), y, self._adjustment)

    def report(self) -> Payload:
        return counts_report(self._counts)

    def summands(self) -> Payload:
        return self.report()

    def statistics(self, model: EncoderClassifier, images: Tensor, labels: Tensor, precision: Precision,
                   generator: torch.Generator | None = None) -> Payload:
        """The post-hoc adjustment's query: per candidate strength τ', this client's training images that
        ``model``'s logits shifted by −τ'·log π classify right, per class, and its class counts (π: the
        federation's prior, which the query carries)."""
        if PRIOR_KEY not in self.payload:
            raise RuntimeError("fedavg-la-posthoc: the statistics query carried no class prior")
        with torch.no_grad():
            logits = model.classifier(encoder_features(model, images, self.cfg.dataset, precision)).float()
        strengths = candidate_strengths(self.cfg.fedavg_la_posthoc_grid)
        return {HITS_KEY: hits_per_strength(logits, labels, self.payload[PRIOR_KEY], strengths, self.num_classes),
                TOTALS_KEY: label_counts(labels, self.num_classes).numpy().astype(np.int64)}

    def statistics_summands(self, model: EncoderClassifier, images: Tensor, labels: Tensor,
                            precision: Precision, generator: torch.Generator | None = None) -> Payload:
        return self.statistics(model, images, labels, precision)  # integers, dense: summed exactly


class FedAvgLAServer(ServerMethod):
    """Weighted averaging plus the federation's prior, broadcast every round (``global``); with
    ``fedavg-la-posthoc`` the evaluated network's logits shifted by the strength the clients' counts pick."""

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        self.prior = FederationCounts(self.num_classes)
        self.posthoc = cfg.fedavg_la_posthoc != "none"
        self.strengths = candidate_strengths(cfg.fedavg_la_posthoc_grid)
        self.posthoc_strength: float | None = None  # this round's pick

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        return self.prior.prior_payload() if self.cfg.fedavg_la_prior == "global" else {}

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        """The round's counts summed: the very sum secure aggregation would reveal."""
        self.prior.add_reports([r.payload for r in reports])

    def sum_segments(self) -> dict[str, SumSpec]:
        return self.prior.sum_segments()

    def absorb_sums(self, server_round: int, sums: Payload) -> None:
        self.prior.add_sums(sums)

    def statistics_payload(self, server_round: int) -> Payload:
        return self.prior.prior_payload() if self.posthoc else {}

    def statistics_sum_segments(self) -> dict[str, SumSpec]:
        return {HITS_KEY: SumSpec((len(self.strengths), self.num_classes), exact=True),
                TOTALS_KEY: SumSpec((self.num_classes,), exact=True)}

    def absorb_statistics(self, server_round: int, global_model: EncoderClassifier,
                          reports: list[ClientReport]) -> None:
        self.absorb_statistics_sums(server_round, global_model, {
            key: sum(np.asarray(r.payload[key], dtype=np.int64) for r in reports) for key in (HITS_KEY, TOTALS_KEY)})

    def absorb_statistics_sums(self, server_round: int, global_model: EncoderClassifier, sums: Payload) -> None:
        self.posthoc_strength = pick_strength(self.strengths, sums[HITS_KEY], sums[TOTALS_KEY])

    def adjusted_evaluation_model(self, server_round: int, network: EncoderClassifier,
                                  ask_clients: Callable[[EncoderClassifier], None]) -> EncoderClassifier:
        if not self.posthoc:
            return network
        self.posthoc_strength = None
        ask_clients(network)
        assert self.posthoc_strength is not None, "the statistics query picks the strength"
        return shifted_network(network, self.prior.prior_payload()[PRIOR_KEY], self.posthoc_strength)

    def round_metrics(self) -> dict[str, float | int]:
        return {"posthoc_strength": self.posthoc_strength} if self.posthoc else {}

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.prior.state_dict()

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.prior.load_state_dict(state)
