"""CAPT: class-aware prompt tuning for federated long-tailed learning on a frozen CLIP (Hou et al., 2025).

Written from a reading of the public code (README "CAPT"; the paper could be read only as abstract): the
network is :class:`fedlt_app.clip.dual_prompts.DualPromptCLIP` (general prompt g, class-aware prompts a,
coupling F from g to visual prompts); only g, a and F train and travel.

Client (one local epoch of the shared loop): L = α·L_G + β·L_CA + L_LA, with π the class prior,
z = exp(s)·cos(f̂, t̂), T the temperature:

* L_LA = CE(z + log π, y): logit adjustment with τ = 1;
* L_CA = CE(⟨f̂, ā⟩/T + log π, y), ā_c = normalise(mean of a_c's tokens) (``capt-contrastive-space=token``,
  the code; it compares a token-embedding vector with an image feature) or t̂_c (``text-feature``);
* L_G = −mean log softmax over the batch (× n_g) of ⟨f̂_i, ĝ⟩/T, ĝ = normalise(g) (the code's batch-level
  softmax: with n_g = 1 it only evens out the samples' similarity to g).

Weight decay joins the gradient (SGD's own form); with ``capt-mask=fixed`` the rows of a for classes absent
from the batch get no gradient and are put back after the step, so momentum cannot move them either (the
code masks after the step: a no-op, ``capt-mask=code``).

Server (:class:`CAPTServer`), every round on the returned models: KMeans on 1 − JS divergence of the class
shares groups clients by similarity (their a averaged), complete linkage on 1 − c/max c with the head/tail
complementarity c groups them by coverage (their g averaged); the averaged prompts start each member's next
round (``client_model_overrides``; ``capt-deliver-clusters``). Every k-th round, k drawn by the bandit,
the global aggregation: per class c the mean of a_c over the clients whose share p_kc exceeds
``capt-class-threshold`` (else the previous a_c), FedAvg of g and F, every node back to the global model.
The bandit's reward is the clients' accuracy and macro-F1 of the model they received, on their own data,
reported before they train: never test labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.clip.backbone import embed_dim, load_clip
from fedlt_app.clip.classnames import class_names
from fedlt_app.clip.dual_prompts import DualPromptCLIP
from fedlt_app.config import RunConfig, parse_class_list
from fedlt_app.data import FederatedData, to_float
from fedlt_app.methods.base import ClientMethod, ClientReport, Payload, ServerMethod
from fedlt_app.models import EncoderClassifier

GENERAL = "prompts.general"
CLASS_AWARE = "prompts.class_aware"
COUNTS_KEY = "class-counts"
PRIOR_KEY = "class-prior"
VAL_CORRECT = "val-correct"  # per class: the received model's hits on the client's data
VAL_PREDICTED = "val-predicted"  # per class: how often it predicted the class there
HEAD_FRACTION = 0.8  # the code's head: top 80 % of classes by summed share (no effect: see complementarity)
KMEANS_RESTARTS = 10
MAB_STEP = 0.1  # v ← v + 0.1·0.95^t·(r − v)
MAB_DECAY = 0.95
MAB_TAG = 0x63617074  # "capt": the bandit's and KMeans' seed sequence
LOG_PRIOR_FLOOR = 1e-12  # a class with no sample: log π finite (weight ~0) rather than −inf


def capt_model(cfg: RunConfig, data: FederatedData, device: torch.device) -> EncoderClassifier:
    clip = load_clip(cfg.clip_weights, device)
    names = class_names(cfg.dataset, data.num_classes)
    model = DualPromptCLIP(clip, cfg.dataset, names, cfg.capt_n_ctx, cfg.capt_n_general)
    if clip.token_embedding.weight.shape[1] != embed_dim(clip):
        raise ValueError(f"capt-contrastive-space: CAPT compares prompt tokens (width "
                         f"{clip.token_embedding.weight.shape[1]}) with image features (width {embed_dim(clip)}); "
                         "this CLIP's widths differ (ViT-B/16's are both 512)")
    return model.to(device)


# ---------------------------------------------------------------- client


def capt_losses(model: DualPromptCLIP, x: Tensor, y: Tensor, log_prior: Tensor, temperature: float,
                space: str) -> tuple[Tensor, Tensor, Tensor]:
    """(L_LA, L_CA, L_G) on one batch."""
    features = model.image_features(x).float()
    text = model.text_features().float()
    logits = model.logits_of(features, text)
    log_prior = log_prior.to(features.device)
    l_la = F.cross_entropy(logits + log_prior, y)
    anchors = F.normalize(model.prompts.class_aware.float().mean(dim=1), dim=-1) if space == "token" else text
    l_ca = F.cross_entropy(features @ anchors.t() / temperature + log_prior, y)
    general = F.normalize(model.prompts.general.float(), dim=-1)
    similarity = (features @ general.t() / temperature).reshape(-1)  # batch × n_g, one softmax over all
    l_g = -F.log_softmax(similarity, dim=0).mean()
    return l_la, l_ca, l_g


def log_prior_of(counts: np.ndarray | Tensor) -> Tensor:
    prior = torch.as_tensor(np.asarray(counts, dtype=np.float64))
    return torch.log((prior / prior.sum().clamp(min=1)).clamp(min=LOG_PRIOR_FLOOR)).float()


@torch.no_grad()
def received_model_hits(model: DualPromptCLIP, images: Tensor, labels: Tensor, dataset: str,
                        batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(hits per class, predictions per class) of ``model`` on a client's own data: the bandit's reward input."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    num_classes = model.num_classes
    correct = torch.zeros(num_classes, dtype=torch.long)
    predicted = torch.zeros(num_classes, dtype=torch.long)
    text = model.text_features().float()
    for start in range(0, len(labels), batch_size):
        x = to_float(images[start : start + batch_size].to(device), dataset)
        y = labels[start : start + batch_size].cpu()
        guess = model.logits_of(model.image_features(x).float(), text).argmax(dim=1).cpu()
        correct += torch.bincount(y[guess == y], minlength=num_classes)
        predicted += torch.bincount(guess, minlength=num_classes)
    model.train(was_training)
    return correct.numpy(), predicted.numpy()


class CAPTClient(ClientMethod):
    """The three-term loss, weight decay on the prompts, the class-aware mask; reports counts and hits."""

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        self._counts = torch.bincount(labels.reshape(-1).long().cpu(), minlength=self.num_classes)
        global_prior = self.cfg.capt_prior == "global" and PRIOR_KEY in self.payload
        self._log_prior = log_prior_of(self.payload[PRIOR_KEY] if global_prior else self._counts.numpy())
        self._hits: tuple[np.ndarray, np.ndarray] | None = None
        if self.cfg.capt_mab_reward == "val" and self.cfg.capt_share_histogram:
            self._hits = received_model_hits(model, images, labels, self.cfg.dataset)  # before any local step
        self._present = torch.zeros(0, dtype=torch.long)
        self._kept: tuple[Tensor, Tensor] | None = None

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        assert isinstance(model, DualPromptCLIP)
        self._present = y
        l_la, l_ca, l_g = capt_losses(model, x, y, self._log_prior, self.cfg.capt_temperature,
                                      self.cfg.capt_contrastive_space)
        return self.cfg.capt_alpha * l_g + self.cfg.capt_beta * l_ca + l_la

    def before_step(self, model: EncoderClassifier) -> None:
        """Weight decay as SGD adds it; then (``capt-mask=fixed``) no gradient for absent classes' rows of a."""
        decay = self.cfg.capt_weight_decay
        for p in model.parameters():
            if p.requires_grad and p.grad is not None and decay > 0:
                p.grad.add_(p.detach(), alpha=decay)
        if self.cfg.capt_mask != "fixed":
            return
        class_aware = model.prompts.class_aware
        absent = torch.ones(self.num_classes, dtype=torch.bool, device=class_aware.device)
        absent[self._present.to(class_aware.device)] = False
        if class_aware.grad is not None:
            class_aware.grad[absent] = 0
        self._kept = (absent, class_aware.detach()[absent].clone())

    def after_step(self, model: EncoderClassifier) -> None:
        """Absent classes' rows back to their values before the step (momentum would move them)."""
        if self._kept is not None:
            absent, rows = self._kept
            with torch.no_grad():
                model.prompts.class_aware[absent] = rows
            self._kept = None

    def report(self) -> Payload:
        if not self.cfg.capt_share_histogram:
            return {}
        report: Payload = {COUNTS_KEY: self._counts.numpy().astype(np.int64)}
        if self._hits is not None:
            report[VAL_CORRECT], report[VAL_PREDICTED] = (h.astype(np.int64) for h in self._hits)
        return report


# ---------------------------------------------------------------- server: clustering, per-class rule, bandit


def class_shares(counts: np.ndarray) -> np.ndarray:
    """p_k: each row's class counts over its total (rows: clients)."""
    counts = np.asarray(counts, dtype=np.float64)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)


def js_divergence(p: np.ndarray) -> np.ndarray:
    """Pairwise Jensen–Shannon divergence (natural log, probabilities clipped at 1e-10, as the code)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-10, None)
    left, right = p[:, None, :], p[None, :, :]
    middle = (left + right) / 2
    kl = lambda a, b: (a * np.log(a / b)).sum(axis=-1)  # noqa: E731
    return 0.5 * kl(left, middle) + 0.5 * kl(right, middle)


def complementarity(p: np.ndarray, head_fraction: float = HEAD_FRACTION) -> np.ndarray:
    """c(i, j) = Σ_head p_ic(1 − p_jc) + Σ_tail p_ic(1 − p_jc), head the top classes by Σ_k p_kc (the code).

    Both sums are unweighted, so this is 1 − ⟨p_i, p_j⟩ whatever the head: the code's formula, kept.
    """
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(-p.sum(axis=0), kind="stable")
    head = order[: int(len(order) * head_fraction)]
    tail = order[int(len(order) * head_fraction):]
    term = lambda cols: p[:, cols] @ (1.0 - p[:, cols]).T  # noqa: E731
    return term(head) + term(tail)


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, restarts: int = KMEANS_RESTARTS,
           iterations: int = 300) -> np.ndarray:
    """Labels of Lloyd's k-means with k-means++ seeding, best of ``restarts`` by inertia (sklearn's KMeans
    defaults, seeded by the run: the code's was unseeded)."""
    points = np.asarray(points, dtype=np.float64)
    best, best_inertia = np.zeros(len(points), dtype=np.int64), np.inf
    for _ in range(restarts):
        centres = [points[rng.integers(len(points))]]
        while len(centres) < k:
            distance = ((points[:, None] - np.asarray(centres)[None]) ** 2).sum(-1).min(axis=1)
            total = distance.sum()
            pick = rng.choice(len(points), p=distance / total) if total > 0 else rng.integers(len(points))
            centres.append(points[pick])
        centres = np.asarray(centres)
        for _ in range(iterations):
            labels = ((points[:, None] - centres[None]) ** 2).sum(-1).argmin(axis=1)
            moved = np.array([points[labels == j].mean(axis=0) if (labels == j).any() else centres[j]
                              for j in range(k)])
            if np.allclose(moved, centres):
                break
            centres = moved
        inertia = ((points - centres[labels]) ** 2).sum()
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    return best


def complete_linkage(distance: np.ndarray, k: int) -> np.ndarray:
    """Labels of agglomerative clustering with complete linkage cut at ``k`` clusters (scipy's ``maxclust``
    cut of ``linkage(method='complete')``; ties merge the first pair)."""
    clusters = [[i] for i in range(len(distance))]
    while len(clusters) > k:
        _, i, j = min((distance[np.ix_(clusters[i], clusters[j])].max(), i, j)
                      for i in range(len(clusters)) for j in range(i + 1, len(clusters)))
        clusters[i] = clusters[i] + clusters.pop(j)
    labels = np.zeros(len(distance), dtype=np.int64)
    for label, members in enumerate(sorted(clusters)):
        labels[members] = label
    return labels


def similarity_clusters(p: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """KMeans on the rows of 1 − JS (the code clusters rows of the similarity matrix, not the shares)."""
    return kmeans(1.0 - js_divergence(p), min(k, len(p)), rng)


def complementarity_clusters(p: np.ndarray, k: int) -> np.ndarray:
    """Complete linkage on 1 − c/max c (diagonal 0)."""
    c = complementarity(p)
    distance = 1.0 - c / c.max() if c.max() > 0 else np.zeros_like(c)
    np.fill_diagonal(distance, 0.0)
    return complete_linkage(distance, min(k, len(p)))


def cluster_means(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row replaced by the plain mean of its cluster's rows."""
    out = np.empty_like(values)
    for label in np.unique(labels):
        out[labels == label] = values[labels == label].mean(axis=0)
    return out


def per_class_aggregate(class_aware: np.ndarray, shares: np.ndarray, threshold: float,
                        previous: np.ndarray) -> tuple[np.ndarray, int]:
    """a_c ← mean of the clients' a_c with p_kc > threshold; the previous a_c where none qualifies.

    ``class_aware``: (clients, C, tokens, D); returns the new (C, tokens, D) and how many classes qualified.
    """
    qualifies = shares > threshold  # (clients, C)
    out = previous.copy()
    for c in np.flatnonzero(qualifies.any(axis=0)):
        out[c] = class_aware[qualifies[:, c], c].mean(axis=0)
    return out, int(qualifies.any(axis=0).sum())


class Bandit:
    """The code's MABScheduler for ``global_agg_freq`` (its three other drawn parameters were never used):
    ε-greedy, else argmax v_a/(n_a + 1e-5) + √(2 ln(Σn + 1)/(n_a + 1e-5)); v ← v + 0.1·0.95^t·(r − v).

    The value is an exponential average yet divided by the count, as in the code (kept: it is the schedule
    that ran)."""

    def __init__(self, arms: tuple[int, ...], epsilon: float) -> None:
        self.arms = arms
        self.epsilon = epsilon
        self.values = np.zeros(len(arms))
        self.pulls = np.zeros(len(arms))

    def select(self, rng: np.random.Generator) -> int:
        if rng.random() < self.epsilon:
            return int(rng.integers(len(self.arms)))
        bonus = np.sqrt(2 * np.log(self.pulls.sum() + 1) / (self.pulls + 1e-5))
        return int(np.argmax(self.values / (self.pulls + 1e-5) + bonus))

    def update(self, arm: int, reward: float, step: int) -> None:
        self.pulls[arm] += 1
        self.values[arm] += MAB_STEP * MAB_DECAY**step * (reward - self.values[arm])


def macro_f1(correct: np.ndarray, predicted: np.ndarray, counts: np.ndarray) -> float:
    """Macro-F1 over the classes present in the labels or the predictions (sklearn's ``average='macro'``)."""
    tp, fp, fn = correct, predicted - correct, counts - correct
    denominator = 2 * tp + fp + fn
    seen = denominator > 0
    return float((2 * tp[seen] / denominator[seen]).mean()) if seen.any() else 0.0


def bandit_reward(accuracy: float, f1: float, history: list[float]) -> float:
    """0.6·acc + 0.3·macro-F1 + 0.1·(acc_t − acc_{t−4})/5 (the code's; the trend term 0 without acc_{t−4})."""
    trend = (accuracy - history[-5]) / 5 if len(history) >= 5 else 0.0
    return 0.6 * accuracy + 0.3 * f1 + 0.1 * trend


class CAPTServer(ServerMethod):
    """Per-node prompt starts, the two clusterings, the bandit-scheduled per-class global aggregation."""

    reads_client_models = True

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        self.global_state: Payload = {k: v.detach().cpu().numpy().copy() for k, v in model.travelling_state().items()}
        self.node_state: dict[int, Payload] = {}  # partition -> the start of its next round (cluster prompts)
        self.counts: dict[int, np.ndarray] = {}  # partition -> its latest class counts
        self.bandit = Bandit(parse_class_list(cfg.capt_mab_arms), cfg.capt_mab_epsilon)
        self.pending: tuple[int, int] | None = None  # (arm, 0-based round it was drawn in) awaiting its reward
        self.val_accuracy: list[float] = []
        self.metrics: dict[str, float | int] = {}

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        if self.cfg.capt_prior == "global" and self.counts:
            total = np.sum(list(self.counts.values()), axis=0).astype(np.float64)
            return {PRIOR_KEY: total / total.sum()}
        return {}

    def client_model_overrides(self, server_round: int, partition_id: int) -> Payload:
        return dict(self.node_state.get(partition_id, {}))

    def global_model_overrides(self, server_round: int) -> Payload:
        return dict(self.global_state)

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        self.metrics = {}
        sizes = np.array([r.num_examples for r in reports], dtype=np.float64)
        if not self.cfg.capt_share_histogram:  # nothing to cluster on: FedAvg of everything (the code's ablation)
            self.global_state = weighted_means([r.model for r in reports], sizes, self.global_state)
            self.metrics = {"capt_global_aggregation": 1}
            return
        self._reward(server_round, reports)
        for r in reports:
            self.counts[r.partition_id] = np.asarray(r.payload[COUNTS_KEY], dtype=np.int64)
        shares = class_shares(np.stack([r.payload[COUNTS_KEY] for r in reports]))
        rng = np.random.default_rng([self.cfg.seed, server_round, MAB_TAG])
        states = [dict(r.model) for r in reports]
        similar = similarity_clusters(shares, self.cfg.capt_sim_clusters, rng)
        complementary = complementarity_clusters(shares, self.cfg.capt_comp_clusters)
        class_aware = cluster_means(np.stack([s[CLASS_AWARE] for s in states]), similar)
        general = cluster_means(np.stack([s[GENERAL] for s in states]), complementary)
        clustered = [{**s, CLASS_AWARE: a, GENERAL: g} for s, a, g in zip(states, class_aware, general, strict=True)]
        if self.cfg.capt_mab_reward == "val":
            arm = self.bandit.select(rng)
            self.pending = (arm, server_round - 1)
            every = self.bandit.arms[arm]
        else:
            every = 1
        aggregate = (server_round - 1) % every == 0  # the code's `round % freq == 0`, rounds from 0
        self.metrics.update({"capt_aggregate_every": every, "capt_global_aggregation": int(aggregate),
                             "capt_similarity_clusters": int(similar.max() + 1),
                             "capt_complementarity_clusters": int(complementary.max() + 1)})
        if aggregate:
            new_a, qualified = per_class_aggregate(class_aware, shares, self.cfg.capt_class_threshold,
                                                   self.global_state[CLASS_AWARE])
            self.global_state = {**weighted_means(clustered, sizes, self.global_state), CLASS_AWARE: new_a}
            self.node_state.clear()  # every node restarts from the global model
            self.metrics["capt_classes_aggregated"] = qualified
        else:
            for report, state, own in zip(reports, clustered, states, strict=True):
                self.node_state[report.partition_id] = state if self.cfg.capt_deliver_clusters else own

    def _reward(self, server_round: int, reports: list[ClientReport]) -> None:
        """The pending arm's reward from the clients' hits with the model they received (their own data)."""
        held = [r.payload for r in reports if VAL_CORRECT in r.payload]
        if not held:
            return
        correct, predicted, counts = (np.sum([p[key] for p in held], axis=0)
                                      for key in (VAL_CORRECT, VAL_PREDICTED, COUNTS_KEY))
        accuracy = float(correct.sum() / max(counts.sum(), 1))
        reward = bandit_reward(accuracy, macro_f1(correct, predicted, counts), self.val_accuracy)
        self.val_accuracy.append(accuracy)
        self.metrics.update({"capt_val_accuracy": accuracy, "capt_reward": reward})
        if self.pending is not None:
            self.bandit.update(self.pending[0], reward, self.pending[1])
            self.pending = None

    def round_metrics(self) -> dict[str, float | int]:
        return dict(self.metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"global_state": self.global_state, "node_state": self.node_state, "counts": self.counts,
                "bandit_values": self.bandit.values, "bandit_pulls": self.bandit.pulls, "pending": self.pending,
                "val_accuracy": list(self.val_accuracy)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_state = dict(state["global_state"])
        self.node_state = {int(k): dict(v) for k, v in state["node_state"].items()}
        self.counts = {int(k): np.asarray(v) for k, v in state["counts"].items()}
        self.bandit.values = np.asarray(state["bandit_values"], dtype=np.float64)
        self.bandit.pulls = np.asarray(state["bandit_pulls"], dtype=np.float64)
        self.pending = state["pending"]
        self.val_accuracy = list(state["val_accuracy"])


def weighted_means(states: list[Payload], weights: np.ndarray, like: Payload) -> Payload:
    """FedAvg of every entry by ``weights``, in the global entries' dtypes."""
    w = weights / weights.sum()
    return {key: sum(wi * s[key].astype(np.float64) for wi, s in zip(w, states, strict=True)).astype(like[key].dtype)
            for key in like}
