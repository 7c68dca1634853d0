"""RUCR (Huang, Liu, Ye, Chen & Du): representation unification and classifier rectification.

Two parts, both around per-class means ("prototypes") of the *received* global model's features on each
client's un-augmented data:

* Representation unification (every round, in local training). The server combines the round's clients'
  class means into global prototypes, the count-weighted mean over the round's cohort,
  p_c = Σ_k n_{k,c} μ_{k,c} / Σ_k n_{k,c} (zero for a class none of them holds), and the cohort's class
  ratio π_c = Σ_k n_{k,c} / Σ_{k,c'} n_{k,c'}. Each client adds to its cross-entropy

      feature loss = CE( s / t + τ·log π_y · e_y , y ),   s_c = cos(f, p_c) for a class c it holds, else 0,

  weighted by ``rucr-feature-weight`` (official ``bal_simclr_imp``): f is the encoder's feature (the
  classifier's input), t the temperature, τ = ``rucr-times``, and the log ratio is added to the target
  class's logit only.

* Classifier rectification (only in the last rounds, for evaluation). With the norm-means over *all*
  clients, m_c = Σ_k n_{k,c} normalise(μ_{k,c}) / Σ_k n_{k,c} (not re-normalised), each trained client
  builds ``rucr-crt-features-per-class`` mixed features per class, x = λ m_c + (1 − λ) normalise(h) with
  h a feature of one of its own samples (the received model's, un-augmented; a fresh permutation per
  class) and λ ~ U(low, high) rounded to 2 decimals, re-trains a copy of its *locally trained* classifier
  on them (SGD, no momentum, ``rucr-crt-lr``, batch ``rucr-crt-batch-size``, ``rucr-crt-epochs`` epochs,
  ``fedlt_app.methods.retrain.retrain_linear``) and sends it. The server evaluates the round's global
  encoder with the sample-weighted average of those classifiers. Training always continues from the
  FedAvg model: the rectified classifier is never broadcast.

Source: the authors' code, github.com/liuyuxia211/RUCR (``main.py``: ``Local.bal_simclr_imp``,
``get_local_centro``, ``local_crt``, ``CReFF()``; ``utils.py``: ``get_mean``, ``cal_norm_mean``;
``Dataset/dataset.py``: ``MixupDataset_norm``). Defaults are its README / ``run.sh`` run
(``--feat_loss_arg 0.15 --t 0.9 --crt_ep 20 --local_bal_ep 50 --crt_feat_num 100 --lr_cls_balance 0.01
--uniform_left 0.35 --uniform_right 0.95``; ``--times`` 1.0 and ``--crt_batch_size`` 256 from
``options.py``). ``options.py``'s own defaults (``feat_loss_arg`` 0, ``crt_ep`` 0, ``local_bal_ep`` 0,
``crt_feat_num`` 0) switch both parts off and crash the last round (an empty mixup set is stacked), so
they are not a usable default.

Rounds of rectification. The official condition is ``crt_ep >= num_rounds - r`` (rounds counted from 1):
the last ``rucr-crt-rounds`` + 1 rounds. This module keeps that count (with 0, the last round only).

How fedlt gets the class means. The official simulation computes them at the start of each round on the
model about to be trained. Here they come from the statistics query (``ClientMethod.statistics``), which
every client answers on each round's new global model, i.e. on the model the next round trains: the
server keeps every client's (classes, counts, means), learns the next cohort in ``begin_round`` and
broadcasts the cohort's prototypes and class ratio, and in rectification rounds the norm-means over all
clients. Round 1 therefore has no prototypes (nothing has been queried yet): it trains with cross-entropy
alone and does not rectify, where the official code uses the random initial model's means. The query is
not asked after the last round (nothing trains on that model).

Disagreements with FedLTLib (gzhu-hcai/LongTailLib ``clientrucr.py`` / ``serverrucr.py``) and flaws of
the official code, and what this module does:

* Mode of the centroid pass. The official ``get_local_centro`` never calls ``eval()``: BatchNorm runs on
  batch statistics (means depend on the shuffled batch composition). FedLTLib and fedlt: eval mode.
* A class no client holds. The official mixup set indexes ``means[cls]`` for every class (a KeyError if
  one is missing); FedLTLib and fedlt skip it.
* More mixed features than local samples. Official: IndexError; FedLTLib and fedlt cycle through the
  permutation (``i mod n``).
* ``crt_ep = 0``. The official loop then gathers ``ccvr_means`` from the cohort only but pairs them with
  every client's class counts by position (a misalignment); fedlt always uses all clients' statistics.
* FedLTLib's defaults (``register_cli_args``) equal the official README's; its client fallbacks
  (``getattr`` defaults 0) are the official options.py zeros. FedLTLib computes prototypes on the
  server's model objects in one process; fedlt's clients send them.
* Not copied: the official global-RNG draws (``np.random``, ``torch.randperm``); fedlt draws λ and the
  permutations from the client's method stream.

Communication per round: down, the prototypes (C·d) and class ratio (C), plus the norm-means (C·d) in
rectification rounds; up, in rectification rounds the rectified classifier (C·d + C); and the statistics
query, to *every* client after each round but the last: the model down, and per held class its count and
mean (d floats) up. Secure aggregation: refused (the server needs each client's class means).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.methods.base import ClientMethod, ClientReport, Payload, ServerMethod
from fedlt_app.methods.features import encoder_features
from fedlt_app.methods.retrain import retrain_linear, with_classifier
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import Precision, full_precision, precision_for

PROTOTYPES = "rucr-prototypes"  # (C, d) the cohort's count-weighted class means (zero rows: no holder)
CLASS_RATIO = "rucr-class-ratio"  # (C,) the cohort's class counts / their total
NORM_MEANS = "rucr-norm-means"  # (C, d) rectification rounds: count-weighted mean of normalised class means
NORM_HOLDERS = "rucr-norm-holders"  # (C,) bool, the classes some client holds (rows of NORM_MEANS that exist)
WEIGHT, BIAS = "rucr-weight", "rucr-bias"  # a client's rectified classifier
FEATURE_LOSS = "rucr-feature-loss"  # (1,) mean feature loss over the local steps (metrics)
MEANS_QUERY_PLAN = "class-means query for the next round"  # round_plan's entry: a resume keeps it


def rectification_round(cfg: RunConfig, server_round: int) -> bool:
    """The official ``crt_ep >= num_rounds - r``: the last ``rucr-crt-rounds`` + 1 rounds."""
    return cfg.rucr_crt_rounds >= cfg.num_server_rounds - server_round


def class_means(features: Tensor, labels: Tensor, num_classes: int) -> Payload:
    """Per class present: count and mean feature (float64 sums, float32 sent)."""
    features, labels = features.double().cpu(), labels.cpu()
    classes = [c for c in range(num_classes) if bool((labels == c).any())]
    means = [features[labels == c].mean(dim=0) for c in classes]
    return {"rucr-classes": np.asarray(classes, dtype=np.int64),
            "rucr-counts": np.asarray([int((labels == c).sum()) for c in classes], dtype=np.int64),
            "rucr-means": (torch.stack(means).float().numpy() if classes
                           else np.zeros((0, features.shape[1]), dtype=np.float32))}


def unified_prototypes(statistics: list[Payload], num_classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(p, counts): the count-weighted mean of the clients' class means (official ``get_mean``), and the
    summed class counts; a class none of them holds has a zero row and count 0."""
    sums, counts = np.zeros((num_classes, dim)), np.zeros(num_classes, dtype=np.int64)
    for payload in statistics:
        for c, n, mean in zip(payload["rucr-classes"], payload["rucr-counts"], payload["rucr-means"], strict=True):
            sums[c] += n * mean.astype(np.float64)
            counts[c] += n
    held = counts > 0
    sums[held] /= counts[held, None]
    return sums, counts


def normalised_means(statistics: list[Payload], num_classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(m, held): per class the count-weighted mean of the clients' *normalised* class means (official
    ``cal_norm_mean``; the result is not normalised again), and which classes some client holds."""
    sums, counts = np.zeros((num_classes, dim)), np.zeros(num_classes, dtype=np.int64)
    for payload in statistics:
        for c, n, mean in zip(payload["rucr-classes"], payload["rucr-counts"], payload["rucr-means"], strict=True):
            mean = mean.astype(np.float64)
            sums[c] += n * mean / max(np.linalg.norm(mean), 1e-12)  # F.normalize's eps
            counts[c] += n
    held = counts > 0
    sums[held] /= counts[held, None]
    return sums, held


def balanced_prototype_loss(features: Tensor, labels: Tensor, prototypes: Tensor, held: Tensor,
                            log_ratio: Tensor, temperature: float, times: float) -> Tensor:
    """Official ``bal_simclr_imp``: CE over cos(f, p_c)/t (0 for a class the client lacks), the target's logit
    raised by ``times`` · log π_y."""
    cosine = F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).T
    logits = cosine.masked_fill(~held, 0.0) / temperature
    logits = logits.scatter_add(1, labels[:, None], (times * log_ratio[labels])[:, None])
    return F.cross_entropy(logits, labels)


def mixed_features(norm_means: Tensor, classes: list[int], own_features: Tensor, per_class: int, low: float,
                   high: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Official ``MixupDataset_norm``: per class, λ m_c + (1 − λ) normalise(h), λ = round(U(low, high), 2),
    h through a fresh permutation of the client's features (cycled when it has fewer than ``per_class``)."""
    rows, labels = [], []
    unit = F.normalize(own_features, dim=1)
    for c in classes:
        order = torch.randperm(len(unit), generator=generator)
        picks = order[torch.arange(per_class) % len(unit)]
        lam = torch.round((low + (high - low) * torch.rand(per_class, generator=generator, dtype=torch.float64))
                          * 100) / 100
        lam = lam.to(unit.device, unit.dtype)[:, None]
        rows.append(lam * norm_means[c] + (1 - lam) * unit[picks.to(unit.device)])
        labels += [c] * per_class
    return torch.cat(rows), torch.tensor(labels, dtype=torch.long, device=unit.device)


class RUCRClient(ClientMethod):
    """Cross-entropy + the balanced prototype term; in rectification rounds, a re-trained copy of its classifier."""

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        device = next(model.parameters()).device
        self.generator = generator
        self.precision = precision_for(self.cfg.precision, device)
        self._report: Payload = {}
        self._feature_sum, self._feature_steps = torch.zeros((), device=device), 0
        held = torch.bincount(labels, minlength=self.num_classes) > 0
        self.held = held.to(device)
        self.prototypes: Tensor | None = None
        if PROTOTYPES in self.payload and self.cfg.rucr_feature_weight > 0:
            ratio = torch.from_numpy(self.payload[CLASS_RATIO]).double()
            if bool((ratio[held] > 0).all()):  # else this client was missing from the prototypes (failed query)
                self.prototypes = torch.from_numpy(self.payload[PROTOTYPES]).float().to(device)
                self.log_ratio = ratio.clamp_min(torch.finfo(torch.float64).tiny).log().float().to(device)
        self.own_features: Tensor | None = None
        if NORM_MEANS in self.payload:  # the received model's features of the un-augmented local data
            self.own_features = encoder_features(model, images, self.cfg.dataset, self.precision)

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        f = model.encoder(x)
        loss = F.cross_entropy(model.classifier(f).float(), y)
        if self.prototypes is None:
            return loss
        with full_precision(x.device.type):
            feature_loss = balanced_prototype_loss(f.float(), y, self.prototypes, self.held, self.log_ratio,
                                                   self.cfg.rucr_temperature, self.cfg.rucr_times)
        self._feature_sum += feature_loss.detach()
        self._feature_steps += 1
        return loss + self.cfg.rucr_feature_weight * feature_loss

    def finish(self, model: EncoderClassifier) -> None:
        """Rectification round: re-train a copy of the trained classifier on the mixed features."""
        if self.own_features is None or len(self.own_features) == 0:
            return
        classifier = copy.deepcopy(model.classifier)
        assert isinstance(classifier, nn.Linear)
        classifier.requires_grad_(True)
        held = self.payload[NORM_HOLDERS].astype(bool)
        norm_means = torch.from_numpy(self.payload[NORM_MEANS]).float().to(self.own_features.device)
        features, labels = mixed_features(norm_means, np.flatnonzero(held).tolist(), self.own_features,
                                          self.cfg.rucr_crt_features_per_class, self.cfg.rucr_mixup_low,
                                          self.cfg.rucr_mixup_high, self.generator)
        retrain_linear(classifier, features, labels, epochs=self.cfg.rucr_crt_epochs, lr=self.cfg.rucr_crt_lr,
                       batch_size=self.cfg.rucr_crt_batch_size, generator=self.generator, precision=self.precision)
        self._report = {WEIGHT: classifier.weight.detach().cpu().numpy().copy(),
                        BIAS: classifier.bias.detach().cpu().numpy().copy()}

    def report(self) -> Payload:
        mean = float(self._feature_sum) / max(self._feature_steps, 1)
        return {**self._report, FEATURE_LOSS: np.array([mean if self._feature_steps else np.nan], dtype=np.float32)}

    def statistics(self, model: EncoderClassifier, images: Tensor, labels: Tensor, precision: Precision,
                   generator: torch.Generator | None = None) -> Payload:
        """Per held class: count and mean feature of the (new global) model on the un-augmented local data."""
        return class_means(encoder_features(model, images, self.cfg.dataset, precision), labels, self.num_classes)


class RUCRServer(ServerMethod):
    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        if not isinstance(model.classifier, nn.Linear):
            raise ValueError("method: 'rucr' re-trains a linear classifier; this model's head is not nn.Linear")
        self.dim = model.feature_dim
        self.statistics: dict[int, Payload] = {}  # partition id -> its class means on the current global model
        self.cohort: list[int] = []
        self.classifier: nn.Linear | None = None  # this round's rectified classifier (evaluation only)
        self.feature_loss = float("nan")

    def begin_round(self, server_round: int, cohort: list[int]) -> None:
        self.cohort = list(cohort)

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        cohort = [self.statistics[p] for p in self.cohort if p in self.statistics]
        if not cohort:  # round 1 (or after resume-from without statistics): cross-entropy alone
            return {}
        prototypes, counts = unified_prototypes(cohort, self.num_classes, self.dim)
        if counts.sum() == 0:
            return {}
        payload = {PROTOTYPES: prototypes.astype(np.float32), CLASS_RATIO: counts / counts.sum()}
        if rectification_round(self.cfg, server_round):
            norm_means, held = normalised_means(list(self.statistics.values()), self.num_classes, self.dim)
            payload |= {NORM_MEANS: norm_means.astype(np.float32), NORM_HOLDERS: held}
        return payload

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        """The sample-weighted average of the rectified classifiers (official ``model_fusion``), if any came."""
        rectified = [r for r in reports if WEIGHT in r.payload]
        self.classifier = None
        if rectified:
            total = sum(r.num_examples for r in rectified)
            classifier = nn.Linear(self.dim, self.num_classes)
            with torch.no_grad():
                classifier.weight.copy_(torch.from_numpy(sum(r.num_examples / total * r.payload[WEIGHT].astype(
                    np.float64) for r in rectified)))
                classifier.bias.copy_(torch.from_numpy(sum(r.num_examples / total * r.payload[BIAS].astype(
                    np.float64) for r in rectified)))
            self.classifier = classifier
        losses = [float(r.payload[FEATURE_LOSS][0]) for r in reports
                  if FEATURE_LOSS in r.payload and np.isfinite(r.payload[FEATURE_LOSS][0])]
        self.feature_loss = float(np.mean(losses)) if losses else float("nan")

    @classmethod
    def round_plan(cls, cfg: RunConfig, server_round: int) -> dict[str, Any]:
        return {"rectification (rucr-crt-rounds)": rectification_round(cfg, server_round),
                # the next round's prototypes; none after the last
                MEANS_QUERY_PLAN: server_round < cfg.num_server_rounds}

    def wants_statistics(self, server_round: int) -> bool:
        return self.round_plan(self.cfg, server_round)[MEANS_QUERY_PLAN]

    def absorb_statistics(self, server_round: int, global_model: EncoderClassifier,
                          reports: list[ClientReport]) -> None:
        self.statistics = {r.partition_id: r.payload for r in reports}  # a client that failed has none

    def evaluation_model(self, global_model: EncoderClassifier) -> EncoderClassifier:
        return with_classifier(global_model, self.classifier)

    def round_metrics(self) -> dict[str, float | int]:
        return {"rucr_feature_loss": self.feature_loss, "rucr_rectified": int(self.classifier is not None)}

    def state_dict(self) -> dict[str, Any]:
        return {"statistics": {p: dict(s) for p, s in self.statistics.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.statistics = {int(p): dict(s) for p, s in state["statistics"].items()}
