"""FedLC: federated learning via logits calibration (Zhang et al., ICML 2022).

Each client subtracts a class-wise margin from its logits before the
softmax cross-entropy, the margin growing as the class gets rarer *on that
client*:

    z̃_c = z_c − τ · n_{k,c}^(−1/4),    loss = CE(z̃, y)

with n_{k,c} client k's training count of class c (counted once, in
``begin``, from the client's own labels). Only the local loss changes: the
server is plain FedAvg and inference (``model(x)``) uses the uncalibrated
logits.

``fedlc-counts=federation`` is FedLTLib's reading instead: every client
calibrates with the federation's counts n_c = Σ_k n_{k,c}, so every client
has the same margins and no class leaves a client's softmax. FedLTLib's
server reads every client's ``sample_per_class`` before training; here the
clients report their counts (exact integers, so secure aggregation carries
them as a sum): the round-1 cohort answers a statistics query before any
training, every training reply adds its counts again, and the server
broadcasts the running total scaled to the whole federation (total ÷ clients
counted × clients in the federation: exact with full participation, an
estimate from the cohorts seen otherwise).

Source. No code from the authors could be found (Flower's FedLC baseline,
too, takes its τ from other ports). This follows
FedLTLib (github.com/gzhu-hcai/LongTailLib, ``system/flcore/clients/
clientlc.py`` and ``system/flcore/servers/serverlc.py``):
``loss = CrossEntropyLoss(output − τ·count^(−1/4), y)``, τ default 1.0
(``system/main.py``: ``--tau``, default 1.0).

Disagreements and what this module does:

* Whose counts. The paper's n_{c,y} is client c's own count. FedLTLib's
  server sums ``sample_per_class`` over *all* clients and gives every client
  the same global calibration (a global logit adjustment, and it needs every
  client's label counts on the server). The default follows the paper: each
  client's own counts, which also needs nothing beyond the client's data.
  (FL-bench, FedDecorr's ``fedlogitcal`` and Flower's baseline also use local
  counts.) ``fedlc-counts=federation`` is FedLTLib's, above.
* Normaliser. The paper's Eq. (as we read it; the paper text was not
  retrievable to re-check here) writes the calibrated loss as
  −log(e^{z̃_y} / Σ_{y'≠y} e^{z̃_y'}), the target excluded from the
  denominator; FedLTLib (its live code; a commented-out variant excludes the
  target), FL-bench, FedDecorr and Flower's baseline all use the ordinary
  softmax cross-entropy over every class. We follow the code: plain CE on the
  calibrated logits (the excluded-target form is unbounded below).
* Classes a client lacks (n = 0). FedLTLib computes ``count ** (-1/4)`` in
  floating point, so n = 0 gives an infinite margin: the class's calibrated
  logit is −∞ and it drops out of the softmax (its logit gets no gradient).
  We do the same. (FL-bench clamps n to 1e-8 instead: a finite margin of
  100·τ, nearly the same.) At τ = 0 FedLTLib's 0·∞ would be NaN; here τ = 0
  gives no margin at all, i.e. exactly FedAvg+CE.
* τ. Flower's baseline README says the paper does not specify it (not
  re-checked against the paper here); FedLTLib's default is 1.0 (FedDecorr's ``calibration_temp`` 0.1, Flower's
  baseline 0.5). We use FedLTLib's 1.0.
* FedLTLib tiles the calibration to ``batch_size`` rows (it relies on
  ``drop_last=True``); we broadcast, so a short last batch is calibrated too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.methods.base import ClientMethod, ClientReport, Payload, ServerMethod, SumSpec
from fedlt_app.methods.class_prior import FederationCounts, counts_report, label_counts
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import Precision

FEDERATION_COUNTS_KEY = "federation-class-counts"  # the server's broadcast (fedlc-counts=federation)


def calibration_margins(class_counts: Tensor, tau: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """τ · n_c^(−1/4) per class; +∞ for a class with n_c = 0 (0 for every class when τ = 0)."""
    counts = class_counts.to(dtype)
    if tau == 0:
        return torch.zeros_like(counts)
    return tau * counts.pow(-0.25)  # 0 ** -0.25 = inf, as in FedLTLib


def calibrated_logits(logits: Tensor, class_counts: Tensor, tau: float) -> Tensor:
    """z_c − τ · n_c^(−1/4) for every row of ``logits`` (classes with n_c = 0 become −∞)."""
    return logits - calibration_margins(class_counts, tau, logits.dtype).to(logits.device)


def calibrated_loss(logits: Tensor, targets: Tensor, class_counts: Tensor, tau: float) -> Tensor:
    """FedLC's local loss: mean cross-entropy on the calibrated logits."""
    return F.cross_entropy(calibrated_logits(logits, class_counts, tau), targets)


class FedLCClient(ClientMethod):
    """The calibrated loss, with the client's own counts or (``fedlc-counts=federation``) the broadcast ones."""

    class_counts: Tensor

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        self._own_counts = label_counts(labels, self.num_classes)
        counts = self._own_counts
        if self.cfg.fedlc_counts == "federation":
            if FEDERATION_COUNTS_KEY not in self.payload:
                raise RuntimeError("fedlc-counts=federation: the training message carried no federation counts")
            counts = torch.from_numpy(np.asarray(self.payload[FEDERATION_COUNTS_KEY], dtype=np.float64))
        self.class_counts = counts.to(next(model.parameters()).device)

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        return calibrated_loss(model(x), y, self.class_counts, self.cfg.fedlc_tau)

    def report(self) -> Payload:
        return counts_report(self._own_counts, count_reporters=True) if self.cfg.fedlc_counts == "federation" else {}

    def summands(self) -> Payload:
        return self.report()

    def statistics(self, model: EncoderClassifier, images: Tensor, labels: Tensor, precision: Precision,
                   generator: torch.Generator | None = None) -> Payload:
        """The server's round-1 query (``federation``): this client's class counts, before any training."""
        return counts_report(label_counts(labels, self.num_classes), count_reporters=True)

    def statistics_summands(self, model: EncoderClassifier, images: Tensor, labels: Tensor,
                            precision: Precision, generator: torch.Generator | None = None) -> Payload:
        return self.statistics(model, images, labels, precision)  # integers, dense: summed exactly


class FedLCServer(ServerMethod):
    """Plain FedAvg, plus (``fedlc-counts=federation``) the federation's class counts: asked of the round-1
    cohort before training, added from every training reply, broadcast every round."""

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        self.federation = cfg.fedlc_counts == "federation"
        num_clients = data.num_clients if self.federation else 0
        self.counts = FederationCounts(self.num_classes, num_clients, count_reporters=True)

    def wants_statistics_before_training(self, server_round: int) -> bool:
        return self.federation and self.counts.federation_counts() is None

    def absorb_statistics(self, server_round: int, global_model: EncoderClassifier,
                          reports: list[ClientReport]) -> None:
        self.absorb(server_round, reports)

    def statistics_sum_segments(self) -> dict[str, SumSpec]:
        return self.sum_segments()

    def absorb_statistics_sums(self, server_round: int, global_model: EncoderClassifier, sums: Payload) -> None:
        self.absorb_sums(server_round, sums)

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        estimate = self.counts.federation_counts() if self.federation else None
        return {FEDERATION_COUNTS_KEY: estimate} if estimate is not None else {}

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        if self.federation:
            self.counts.add_reports([r.payload for r in reports])

    def sum_segments(self) -> dict[str, SumSpec]:
        return self.counts.sum_segments() if self.federation else {}

    def absorb_sums(self, server_round: int, sums: Payload) -> None:
        if self.federation:
            self.counts.add_sums(sums)

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.counts.state_dict() if self.federation else {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if self.federation:
            self.counts.load_state_dict(state)
