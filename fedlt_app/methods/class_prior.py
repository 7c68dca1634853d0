"""Logit adjustment by a class prior, and the federation's prior summed from the clients' class counts.

Shared by fedlt's logit-adjusted methods, GRAPE-LA (RedGrape's two heads) and FedAvg-LA (one head), and by
FedLC with ``fedlc-counts=federation`` (the same running total, scaled to the federation instead of normalised).
The logit adjustment of Menon et al. (ICLR 2021) trains on CE(z + τ·log π, y): instance-balanced
cross-entropy learns p(y|x) ∝ p(x|y)·π(y), and adding the prior to the training logits lets the softmax
absorb it, so the network's own logits (used unchanged at inference) estimate p(x|y), the Bayes
classifier for the balanced error.

The federation's prior needs only a sum: every client reports its class counts (an exact integer
vector, so secure aggregation can carry it), the server adds each round's sum to a running total and
broadcasts the normalised total. With full participation every round adds the same vector (the prior
is exact from round 2 on); with sampled cohorts the running total is an unbiased estimate.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.methods.base import Payload, SumSpec

PRIOR_KEY = "class-prior"  # the server's broadcast: the federation's normalised class counts
COUNTS_KEY = "class-counts"  # a client's report (and secure-aggregation summand): its class counts
REPORTERS_KEY = "reporting-clients"  # 1 per client beside its counts: the sum says how many clients reported


def log_prior_adjustment(prior: Tensor, tau: float) -> Tensor:
    """τ·log π per class (−∞ where π = 0; all zeros when τ = 0)."""
    prior = prior.double()
    if tau == 0:
        return torch.zeros_like(prior, dtype=torch.float32)
    return (tau * torch.log(prior / prior.sum())).float()


def adjusted_loss(logits: Tensor, targets: Tensor, adjustment: Tensor) -> Tensor:
    """The logit-adjusted cross-entropy: CE(z + τ·log π, y)."""
    return F.cross_entropy(logits + adjustment.to(logits.device, logits.dtype), targets)


def label_counts(labels: Tensor, num_classes: int) -> Tensor:
    """A client's class counts (int64, on the CPU)."""
    return torch.bincount(labels.reshape(-1).long().cpu(), minlength=num_classes)


def training_prior(payload: Payload, counts: Tensor, which: str) -> Tensor:
    """The prior a client adjusts by: the broadcast federation prior for ``global`` once the server has one,
    else (``local``, or round 1) the client's own label distribution, where a class it lacks gets log 0 = −∞
    and leaves its softmax."""
    if which == "global" and PRIOR_KEY in payload:
        return torch.from_numpy(np.asarray(payload[PRIOR_KEY], dtype=np.float64))
    return counts.double()


class FederationCounts:
    """The server's running total of the clients' class counts, and what it broadcasts from it.

    One total serves two uses. Normalised, it is the federation's class prior (FedAvg-LA, GRAPE-LA:
    ``prior_payload``). Scaled to the whole federation, n_c = total ÷ reports × clients, it is FedLC's
    ``fedlc-counts=federation`` (``federation_counts``), which needs the number of reports summed as well: with
    ``count_reporters`` every client sends a 1 beside its counts (``counts_report``), so secure aggregation
    reveals that number as one more sum. The prior needs no tally (the normalisation cancels it).
    """

    def __init__(self, num_classes: int, num_clients: int = 0, count_reporters: bool = False) -> None:
        self.num_classes = num_classes
        self.num_clients = num_clients
        self.count_reporters = count_reporters
        self.count_total = np.zeros(num_classes, dtype=np.int64)
        self.clients_counted = 0  # reports summed so far (a client reporting in several rounds counts each time)

    def add(self, counts: np.ndarray, reporters: int = 0) -> None:
        """One sum of reports, over ``reporters`` clients (secure aggregation reveals exactly this sum)."""
        self.count_total += np.asarray(counts, dtype=np.int64)
        self.clients_counted += int(reporters)

    def add_reports(self, payloads: list[Payload]) -> None:
        """The plain path's reports, summed as secure aggregation would sum them."""
        if payloads:
            reporters = len(payloads) if self.count_reporters else 0  # as the secure path: no tally unless asked
            self.add(sum(np.asarray(p[COUNTS_KEY], dtype=np.int64) for p in payloads), reporters)

    def add_sums(self, sums: Payload) -> None:
        """The secure path's sums (``sum_segments``)."""
        reporters = int(np.asarray(sums[REPORTERS_KEY]).reshape(-1)[0]) if self.count_reporters else 0
        self.add(sums[COUNTS_KEY], reporters)

    def prior_payload(self) -> Payload:
        """``{PRIOR_KEY: normalised total}``; empty until a count has arrived (clients then use their own)."""
        total = self.count_total.sum()
        return {PRIOR_KEY: self.count_total / total} if total > 0 else {}

    def federation_counts(self) -> np.ndarray | None:
        """n_c for the whole federation: the mean report times the number of clients (None before any report;
        needs ``count_reporters``)."""
        if not self.count_reporters:
            raise ValueError("federation_counts needs count_reporters=True (the number of reports summed)")
        if self.clients_counted == 0:
            return None
        return self.count_total.astype(np.float64) * (self.num_clients / self.clients_counted)

    def sum_segments(self) -> dict[str, SumSpec]:
        """The clients' counts (and, with ``count_reporters``, their 1s), summed exactly."""
        segments = {COUNTS_KEY: SumSpec((self.num_classes,), exact=True)}
        if self.count_reporters:
            segments[REPORTERS_KEY] = SumSpec((1,), exact=True)
        return segments

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"count_total": self.count_total, "clients_counted": np.asarray(self.clients_counted)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.count_total = np.asarray(state["count_total"], dtype=np.int64)
        self.clients_counted = int(state.get("clients_counted", 0))  # checkpoints before the tally have none


def counts_report(counts: Tensor, count_reporters: bool = False) -> Payload:
    """A client's report of its class counts (with ``count_reporters``, a 1 beside them)."""
    report: Payload = {COUNTS_KEY: counts.numpy().astype(np.int64)}
    if count_reporters:
        report[REPORTERS_KEY] = np.ones(1, dtype=np.int64)
    return report
