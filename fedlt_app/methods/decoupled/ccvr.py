"""CCVR (Luo et al., NeurIPS 2021): Classifier Calibration with Virtual Representations.

Training is FedAvg with cross-entropy. Calibration is post-hoc and never
feeds back into training: the server sends the global model to every client
(not only the round's cohort), each client computes, per class it holds, the
count N_{c,k}, mean μ_{c,k} and unbiased covariance Σ_{c,k} of the global
encoder's features on its un-augmented local data; the server combines them
exactly into the global class statistics (the paper's Eqs. 3–4)

    μ_c = Σ_k N_{c,k}/N_c · μ_{c,k}
    Σ_c = Σ_k (N_{c,k}−1)/(N_c−1) Σ_{c,k} + Σ_k N_{c,k}/(N_c−1) μ_{c,k}μ_{c,k}ᵀ − N_c/(N_c−1) μ_c μ_cᵀ,

draws ``ccvr-virtual-per-class`` (the paper's M_c) virtual features per class
from N(μ_c, Σ_c), re-trains a copy of the global classifier on them and
evaluates the global encoder with that calibrated classifier.  The global
model the clients keep training is not touched.

No official code was found (none is linked from the paper; users asking for
it, e.g. shangxinyi/CReFF-FL issue #2, were pointed at re-implementations).  This follows FedLTLib
(gzhu-hcai/LongTailLib ``serverccvr.py``/``clientccvr.py``, itself a port of
the unofficial Laughing-q/Fed-CCVR): 2000 virtual features per class, 10
epochs of SGD at lr 0.001, momentum 0.9, weight decay 1e-5, batch = the local
batch size, starting from the global classifier; classes no client holds get
no virtual features.  Where FedLTLib departs from the paper this follows the
paper: clients send the unbiased covariance (FedLTLib sends the 1/N one while
its server combines with the paper's 1/(N−1) formula, so its Σ_c is not the
pooled covariance); a class seen once in the federation gets Σ_c = 0 (FedLTLib
takes the first client's entry); the Gaussian is sampled through an
eigendecomposition with negative eigenvalues clipped to 0 (FedLTLib adds
1e-6·I and calls numpy's multivariate_normal).  FedLTLib calibrates once after
the last round; ``ccvr-calibrate`` = ``every-round`` (default) applies the
same calibration to every round's global model for the per-round curves (as
FL-bench's CCVR does at each test; training is unaffected, so the last round's
row is the post-hoc result), ``final`` only to the last round's.

Under secure aggregation (``secure-aggregation=secagg``) the statistics query is a second masked instance of
the protocol: each client sends, per class, its count, Σ x and Σ x xᵀ (:func:`class_sums`), the server
learns only their sums over the clients, and :func:`moments_from_sums` gives the same pooled μ_c and Σ_c.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.methods.base import ClientMethod, ClientReport, Payload, ServerMethod, SumSpec
from fedlt_app.methods.features import encoder_features
from fedlt_app.methods.retrain import retrain_linear, with_classifier
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import Precision

RETRAIN_MOMENTUM = 0.9  # FedLTLib's FedCCVR: getattr(args, "momentum", 0.9)
RETRAIN_WEIGHT_DECAY = 1e-5  # FedLTLib's FedCCVR: getattr(args, "weight_decay", 1e-5)
CALIBRATION_PLAN = "calibration (ccvr-calibrate)"  # round_plan's entry: a resume keeps it


def class_moments(features: Tensor, labels: Tensor, num_classes: int) -> Payload:
    """Per class present: count, mean and unbiased covariance (zeros for a single sample), in float64."""
    features, labels = features.double().cpu(), labels.cpu()
    classes = [c for c in range(num_classes) if bool((labels == c).any())]
    counts, means, covariances = [], [], []
    for c in classes:
        x = features[labels == c]
        mean = x.mean(dim=0)
        centred = x - mean
        n = len(x)
        counts.append(n)
        means.append(mean)
        covariances.append(centred.T @ centred / (n - 1) if n > 1 else torch.zeros(x.shape[1], x.shape[1]).double())
    dim = features.shape[1]
    return {
        "ccvr-classes": np.asarray(classes, dtype=np.int64),
        "ccvr-counts": np.asarray(counts, dtype=np.int64),
        "ccvr-means": torch.stack(means).numpy() if classes else np.zeros((0, dim)),
        "ccvr-covariances": torch.stack(covariances).numpy() if classes else np.zeros((0, dim, dim)),
    }


def combine_moments(payloads: list[Payload]) -> dict[int, tuple[int, np.ndarray, np.ndarray]]:
    """Class -> (N_c, μ_c, Σ_c) from the clients' moments, by the paper's Eqs. 3–4 (exact pooled statistics)."""
    per_class: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for payload in payloads:
        for row, c in enumerate(payload["ccvr-classes"].tolist()):
            per_class.setdefault(c, []).append((int(payload["ccvr-counts"][row]), payload["ccvr-means"][row],
                                                payload["ccvr-covariances"][row]))
    combined = {}
    for c, parts in sorted(per_class.items()):
        total = sum(n for n, _, _ in parts)
        mean = sum(n / total * m for n, m, _ in parts)
        if total > 1:
            covariance = (sum((n - 1) / (total - 1) * s for n, _, s in parts)
                          + sum(n / (total - 1) * np.outer(m, m) for n, m, _ in parts)
                          - total / (total - 1) * np.outer(mean, mean))
        else:
            covariance = np.zeros((len(mean), len(mean)))
        combined[c] = (total, np.asarray(mean, dtype=np.float64), np.asarray(covariance, dtype=np.float64))
    return combined


COUNT_SUM, FEATURE_SUM, OUTER_SUM = "ccvr-count", "ccvr-feature-sum", "ccvr-outer-sum"  # under secagg


def class_sums(features: Tensor, labels: Tensor, num_classes: int) -> Payload:
    """Per class (a dense row for every class, zeros where absent): count, Σ x and Σ x xᵀ, in float64.

    What a client sends under secure aggregation instead of its moments: the pooled moments of Eqs. 3–4 are
    a function of these sums over the clients alone (:func:`moments_from_sums`)."""
    features, labels = features.double().cpu(), labels.cpu()
    dim = features.shape[1]
    counts = np.zeros(num_classes, dtype=np.int64)
    firsts, seconds = np.zeros((num_classes, dim)), np.zeros((num_classes, dim, dim))
    for c in range(num_classes):
        x = features[labels == c]
        counts[c] = len(x)
        firsts[c] = x.sum(dim=0).numpy()
        seconds[c] = (x.T @ x).numpy()
    return {COUNT_SUM: counts, FEATURE_SUM: firsts, OUTER_SUM: seconds}


def moments_from_sums(sums: Payload) -> dict[int, tuple[int, np.ndarray, np.ndarray]]:
    """Class -> (N_c, μ_c, Σ_c) from the summed ``class_sums``: μ_c = S1/N, Σ_c = (S2 − N μ μᵀ)/(N − 1).

    The same pooled statistics as :func:`combine_moments` (Σ_k (N_k − 1) Σ_k + N_k μ_k μ_kᵀ is Σ x xᵀ over
    the client's samples); a class held by nobody is left out, one sample gives Σ_c = 0."""
    combined = {}
    for c, total in enumerate(np.asarray(sums[COUNT_SUM]).tolist()):
        if total <= 0:
            continue
        mean = np.asarray(sums[FEATURE_SUM][c], np.float64) / total
        if total > 1:
            covariance = (np.asarray(sums[OUTER_SUM][c], np.float64) - total * np.outer(mean, mean)) / (total - 1)
        else:
            covariance = np.zeros((len(mean), len(mean)))
        combined[c] = (int(total), mean, covariance)
    return combined


def sample_gaussian(mean: np.ndarray, covariance: np.ndarray, count: int, generator: torch.Generator) -> Tensor:
    """``count`` draws from N(mean, covariance) in float64: mean + z·(V·√λ)ᵀ, λ clipped at 0 (PSD-safe)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.from_numpy((covariance + covariance.T) / 2))
    root = eigenvectors * eigenvalues.clamp(min=0).sqrt()
    z = torch.randn(count, len(mean), generator=generator, dtype=torch.float64)
    return torch.from_numpy(mean) + z @ root.T


class CCVRClient(ClientMethod):
    """FedAvg+CE training; on the server's statistics query, per-class feature moments of the global model."""

    def statistics(self, model: EncoderClassifier, images: Tensor, labels: Tensor, precision: Precision,
                   generator: torch.Generator | None = None) -> Payload:
        features = encoder_features(model, images, self.cfg.dataset, precision)
        return class_moments(features, labels, self.num_classes)

    def statistics_summands(self, model: EncoderClassifier, images: Tensor, labels: Tensor,
                            precision: Precision, generator: torch.Generator | None = None) -> Payload:
        return class_sums(encoder_features(model, images, self.cfg.dataset, precision), labels, self.num_classes)


class CCVRServer(ServerMethod):
    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        if not isinstance(model.classifier, nn.Linear):
            raise ValueError("method: 'ccvr' re-trains a linear classifier; this model's head is not nn.Linear")
        self.generator = torch.Generator().manual_seed(cfg.seed + 7919)
        self.classifier: nn.Linear | None = None  # calibrated for this round's global model
        self.feature_dim = model.classifier.in_features
        self.last_retrain_loss = float("nan")

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        self.classifier = None  # a new global model: last round's calibration no longer fits it

    @classmethod
    def round_plan(cls, cfg: RunConfig, server_round: int) -> dict[str, Any]:
        return {CALIBRATION_PLAN: cfg.ccvr_calibrate == "every-round"
                or server_round == cfg.num_server_rounds}

    def wants_statistics(self, server_round: int) -> bool:
        return self.round_plan(self.cfg, server_round)[CALIBRATION_PLAN]

    def absorb_statistics(self, server_round: int, global_model: EncoderClassifier,
                          reports: list[ClientReport]) -> None:
        self.classifier = self.calibrate(global_model, combine_moments([r.payload for r in reports]))

    def statistics_sum_segments(self) -> dict[str, SumSpec]:
        c, d = self.num_classes, self.feature_dim
        return {COUNT_SUM: SumSpec((c,), exact=True), FEATURE_SUM: SumSpec((c, d)), OUTER_SUM: SumSpec((c, d, d))}

    def absorb_statistics_sums(self, server_round: int, global_model: EncoderClassifier, sums: Payload) -> None:
        self.classifier = self.calibrate(global_model, moments_from_sums(sums))

    def virtual_features(self, statistics: dict[int, tuple[int, np.ndarray, np.ndarray]]) -> tuple[Tensor, Tensor]:
        per_class = self.cfg.ccvr_virtual_per_class
        features = torch.cat([sample_gaussian(mean, cov, per_class, self.generator)
                              for _, mean, cov in statistics.values()])
        labels = torch.tensor(list(statistics)).repeat_interleave(per_class)
        return features.float(), labels

    def calibrate(self, global_model: EncoderClassifier,
                  statistics: dict[int, tuple[int, np.ndarray, np.ndarray]]) -> nn.Linear:
        """A copy of the global classifier re-trained on virtual features (FedLTLib's retrain_vr)."""
        classifier = copy.deepcopy(global_model.classifier)
        assert isinstance(classifier, nn.Linear)
        device = classifier.weight.device
        features, labels = self.virtual_features(statistics)
        classifier.train()
        self.last_retrain_loss = retrain_linear(
            classifier, features.to(device), labels.to(device), epochs=self.cfg.ccvr_retrain_epochs,
            lr=self.cfg.ccvr_retrain_lr, batch_size=self.cfg.batch_size, generator=self.generator,
            precision=self.precision, momentum=RETRAIN_MOMENTUM, weight_decay=RETRAIN_WEIGHT_DECAY)
        return classifier

    def evaluation_model(self, global_model: EncoderClassifier) -> EncoderClassifier:
        return with_classifier(global_model, self.classifier)

    def round_metrics(self) -> dict[str, float | int]:
        return {"ccvr_retrain_loss": self.last_retrain_loss if self.classifier is not None else float("nan")}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
