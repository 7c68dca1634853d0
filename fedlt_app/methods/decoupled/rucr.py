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
mean (d floats) up.

Secure aggregation (``secure-aggregation=secagg``, full participation only). Every class-means statistic the
server uses is a count-weighted mean, i.e. a ratio of two sums over clients: p_c = Σ_k n_{k,c} μ_{k,c} / Σ_k
n_{k,c} and m_c = Σ_k n_{k,c} normalise(μ_{k,c}) / Σ_k n_{k,c}. Under secagg each client answers the statistics
query with its dense terms of those sums (``means_summands``: per class n_{k,c}, n_{k,c} μ_{k,c} and n_{k,c}
normalise(μ_{k,c}); zero rows for classes it lacks) inside a second instance of the protocol, and the server
learns only their totals over the clients that answered. The plain path computes through the same sums
(``unified_prototypes`` and ``normalised_means`` sum ``means_summands``), so the two differ by fixed-point
rounding only. What the sums cannot give is a *cohort's* prototypes: the totals run over every client, and the
next cohort is not drawn when the query runs; so secagg needs ``clients-per-round=0`` (every client trains every
round, where cohort and federation coincide) and refuses partial participation. The rectified classifiers'
sample-weighted average and the feature-loss metric are sums too (``rectified_summands``), masked with the
model's delta.
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
from fedlt_app.methods.base import ClientMethod, ClientReport, Payload, ServerMethod, SumSpec
from fedlt_app.methods.class_sums import summed
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
# Secure aggregation's sums (see the module docstring): the statistics query's, per class ...
COUNT_SUM = "rucr-count-sum"  # (C,) exact: Σ_k n_{k,c}
MEAN_SUM = "rucr-mean-sum"  # (C, d): Σ_k n_{k,c} μ_{k,c}
NORM_SUM = "rucr-norm-sum"  # (C, d): Σ_k n_{k,c} normalise(μ_{k,c})
# ... and the train round's: the rectified heads' sample-weighted sum and the feature-loss metric
RECTIFIED_EXAMPLES = "rucr-rectified-examples"  # (1,) exact: Σ n over the clients that rectified
WEIGHT_SUM, BIAS_SUM = "rucr-weight-sum", "rucr-bias-sum"  # (C, d), (C,): Σ n W, Σ n b over them
LOSS_CLIENTS, LOSS_SUM = "rucr-loss-clients", "rucr-loss-sum"  # (1,) exact, (1,): clients with a feature loss


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


def means_segments(num_classes: int, dim: int) -> dict[str, SumSpec]:
    """The statistics query's sums (secure aggregation): class counts, count-weighted means and norm-means."""
    return {COUNT_SUM: SumSpec((num_classes,), exact=True), MEAN_SUM: SumSpec((num_classes, dim)),
            NORM_SUM: SumSpec((num_classes, dim))}


def means_summands(payload: Payload, num_classes: int, dim: int) -> Payload:
    """One client's dense terms of ``means_segments`` from its ``class_means``: per held class n, n μ and
    n normalise(μ) (``F.normalize``'s eps), zero rows for the classes it lacks."""
    counts = np.zeros(num_classes, dtype=np.int64)
    means, norms = np.zeros((num_classes, dim)), np.zeros((num_classes, dim))
    classes = np.asarray(payload["rucr-classes"], dtype=np.int64)
    n = np.asarray(payload["rucr-counts"], dtype=np.int64)
    mean = np.asarray(payload["rucr-means"], dtype=np.float64).reshape(len(classes), dim)
    counts[classes] = n
    means[classes] = n[:, None] * mean
    norms[classes] = n[:, None] * mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return {COUNT_SUM: counts, MEAN_SUM: means, NORM_SUM: norms}


def _per_count(sums: Payload, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``sums[key]`` divided by the summed class counts, zero where a count is 0; the counts)."""
    counts = np.asarray(sums[COUNT_SUM], dtype=np.int64)
    rows = np.zeros(np.shape(sums[key]))
    held = counts > 0
    rows[held] = np.asarray(sums[key], dtype=np.float64)[held] / counts[held, None]
    return rows, counts


def prototypes_from_sums(sums: Payload) -> tuple[np.ndarray, np.ndarray]:
    """(p, counts) from summed ``means_summands``: p_c = Σ n μ / Σ n, a zero row where the count is 0."""
    return _per_count(sums, MEAN_SUM)


def norm_means_from_sums(sums: Payload) -> tuple[np.ndarray, np.ndarray]:
    """(m, held) from summed ``means_summands``: m_c = Σ n normalise(μ) / Σ n, not normalised again."""
    norm_means, counts = _per_count(sums, NORM_SUM)
    return norm_means, counts > 0


def unified_prototypes(statistics: list[Payload], num_classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(p, counts): the count-weighted mean of the clients' class means (official ``get_mean``), and the
    summed class counts; a class none of them holds has a zero row and count 0."""
    return prototypes_from_sums(summed(means_segments(num_classes, dim),
                                       (means_summands(p, num_classes, dim) for p in statistics)))


def normalised_means(statistics: list[Payload], num_classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(m, held): per class the count-weighted mean of the clients' *normalised* class means (official
    ``cal_norm_mean``; the result is not normalised again), and which classes some client holds."""
    return norm_means_from_sums(summed(means_segments(num_classes, dim),
                                       (means_summands(p, num_classes, dim) for p in statistics)))


def rectified_segments(num_classes: int, dim: int) -> dict[str, SumSpec]:
    """The train round's sums (secure aggregation): the rectified heads' n-weighted sums and the loss metric."""
    return {RECTIFIED_EXAMPLES: SumSpec((1,), exact=True), WEIGHT_SUM: SumSpec((num_classes, dim)),
            BIAS_SUM: SumSpec((num_classes,)), LOSS_CLIENTS: SumSpec((1,), exact=True), LOSS_SUM: SumSpec((1,))}


def rectified_summands(report: Payload, num_examples: int, num_classes: int, dim: int) -> Payload:
    """One client's terms of ``rectified_segments`` from its ``report``: n, n W and n b if it rectified (zeros
    otherwise), and 1 and its mean feature loss if it has one (0 and 0 otherwise)."""
    rectified = WEIGHT in report
    n = num_examples if rectified else 0
    weight = report[WEIGHT].astype(np.float64) if rectified else np.zeros((num_classes, dim))
    bias = report[BIAS].astype(np.float64) if rectified else np.zeros(num_classes)
    loss = float(report[FEATURE_LOSS][0]) if FEATURE_LOSS in report else float("nan")
    has_loss = bool(np.isfinite(loss))
    return {RECTIFIED_EXAMPLES: np.array([n], dtype=np.int64), WEIGHT_SUM: n * weight, BIAS_SUM: n * bias,
            LOSS_CLIENTS: np.array([int(has_loss)], dtype=np.int64),
            LOSS_SUM: np.array([loss if has_loss else 0.0])}


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
        self.num_examples, self.feature_dim = len(labels), model.feature_dim
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

    def summands(self) -> Payload:
        """Secure aggregation: this client's terms of the rectified heads' and the feature loss's sums."""
        return rectified_summands(self.report(), self.num_examples, self.num_classes, self.feature_dim)

    def statistics(self, model: EncoderClassifier, images: Tensor, labels: Tensor, precision: Precision,
                   generator: torch.Generator | None = None) -> Payload:
        """Per held class: count and mean feature of the (new global) model on the un-augmented local data."""
        return class_means(encoder_features(model, images, self.cfg.dataset, precision), labels, self.num_classes)

    def statistics_summands(self, model: EncoderClassifier, images: Tensor, labels: Tensor,
                            precision: Precision, generator: torch.Generator | None = None) -> Payload:
        """``statistics`` under secure aggregation, as the dense terms of the server's sums."""
        return means_summands(self.statistics(model, images, labels, precision), self.num_classes, model.feature_dim)


class RUCRServer(ServerMethod):
    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        if not isinstance(model.classifier, nn.Linear):
            raise ValueError("method: 'rucr' re-trains a linear classifier; this model's head is not nn.Linear")
        self.dim = model.feature_dim
        self.statistics: dict[int, Payload] = {}  # partition id -> its class means on the current global model
        self.secure_sums: Payload | None = None  # secure aggregation: every answering client's summed terms
        self.cohort: list[int] = []
        self.classifier: nn.Linear | None = None  # this round's rectified classifier (evaluation only)
        self.feature_loss = float("nan")

    def begin_round(self, server_round: int, cohort: list[int]) -> None:
        self.cohort = list(cohort)

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        if self.secure_sums is not None:  # every client's sums; the cohort is every client (checked in config)
            cohort_sums = everyone = self.secure_sums
        else:
            cohort = [self.statistics[p] for p in self.cohort if p in self.statistics]
            if not cohort:  # round 1 (or after resume-from without statistics): cross-entropy alone
                return {}
            segments = means_segments(self.num_classes, self.dim)
            cohort_sums = summed(segments, (means_summands(p, self.num_classes, self.dim) for p in cohort))
            everyone = None  # summed below, only in the rounds that rectify
        prototypes, counts = prototypes_from_sums(cohort_sums)
        if counts.sum() == 0:
            return {}
        payload = {PROTOTYPES: prototypes.astype(np.float32), CLASS_RATIO: counts / counts.sum()}
        if rectification_round(self.cfg, server_round):
            if everyone is None:
                everyone = summed(segments, (means_summands(p, self.num_classes, self.dim)
                                             for p in self.statistics.values()))
            norm_means, held = norm_means_from_sums(everyone)
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

    def sum_segments(self) -> dict[str, SumSpec]:
        return rectified_segments(self.num_classes, self.dim)

    def absorb_sums(self, server_round: int, sums: Payload) -> None:
        """``absorb`` from the sums: Σ n W / Σ n over the clients that rectified, and the mean feature loss."""
        examples = int(sums[RECTIFIED_EXAMPLES][0])
        self.classifier = None
        if examples > 0:
            classifier = nn.Linear(self.dim, self.num_classes)
            with torch.no_grad():
                classifier.weight.copy_(torch.from_numpy(np.asarray(sums[WEIGHT_SUM]) / examples))
                classifier.bias.copy_(torch.from_numpy(np.asarray(sums[BIAS_SUM]) / examples))
            self.classifier = classifier
        clients = int(sums[LOSS_CLIENTS][0])
        self.feature_loss = float(sums[LOSS_SUM][0]) / clients if clients else float("nan")

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

    def statistics_sum_segments(self) -> dict[str, SumSpec]:
        return means_segments(self.num_classes, self.dim)

    def absorb_statistics_sums(self, server_round: int, global_model: EncoderClassifier, sums: Payload) -> None:
        self.secure_sums = {k: np.asarray(v) for k, v in sums.items()}

    def evaluation_model(self, global_model: EncoderClassifier) -> EncoderClassifier:
        return with_classifier(global_model, self.classifier)

    def round_metrics(self) -> dict[str, float | int]:
        return {"rucr_feature_loss": self.feature_loss, "rucr_rectified": int(self.classifier is not None)}

    def state_dict(self) -> dict[str, Any]:
        return {"statistics": {p: dict(s) for p, s in self.statistics.items()},
                "secure_sums": None if self.secure_sums is None else dict(self.secure_sums)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.statistics = {int(p): dict(s) for p, s in state["statistics"].items()}
        sums = state.get("secure_sums")  # absent from checkpoints written before secure aggregation ran RUCR
        self.secure_sums = None if sums is None else dict(sums)
