"""Logit adjustment by a class prior, and the federation's prior summed from the clients' class counts.

Shared by fedlt's logit-adjusted methods, GRAPE-LA (RedGrape's two heads) and FedAvg-LA (one head).
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


class FederationPrior:
    """The server's running total of the clients' class counts, and the prior it broadcasts."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.count_total = np.zeros(num_classes, dtype=np.int64)

    def payload(self) -> Payload:
        """``{PRIOR_KEY: normalised total}``; empty until a count has arrived (clients then use their own)."""
        total = self.count_total.sum()
        return {PRIOR_KEY: self.count_total / total} if total > 0 else {}

    def add(self, counts: np.ndarray) -> None:
        """One round's counts: summed over its clients (secure aggregation reveals exactly this sum)."""
        self.count_total += np.asarray(counts, dtype=np.int64)

    def sum_segments(self) -> dict[str, SumSpec]:
        """The clients' counts, summed exactly."""
        return {COUNTS_KEY: SumSpec((self.num_classes,), exact=True)}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"count_total": self.count_total}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.count_total = np.asarray(state["count_total"], dtype=np.int64)
