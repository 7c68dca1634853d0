"""FairFAL's query and the random / entropy baselines, on one client's pool.

Read from query_strategies/fairfal_sampling.py and strategy.py of the authors'
code (see ../shared/notes/fairfal.md §1.3). Two passes per query:

Pass 1, :func:`fairfal_statistics` (needs the local-only model, trained first):
    ḡ, ℓ̄ = mean softmax of the global / local-only model over a class-balanced
    resample of the labeled set;
    d_k = (1/C) Σ_c |ḡ_c − ℓ̄_c| / (ḡ_c + ℓ̄_c)      (all C classes)
    r_k = min_{c∈S_k} ḡ_c / max_{c∈S_k} ḡ_c          (S_k: the labeled classes)
The server averages r̄ = mean_k r_k.

Pass 2, :func:`fairfal_query`:
    score = 1 − (1−t)(d_k + r̄) + (1−2t)·d_k·r̄;  uncertainty model = global iff score > 0.75,
    gradient-embedding model = global iff r̄ < 0.5 (else the local-only model);
    H̃(x) = normalised entropy of the uncertainty model;
    ŷ(x) = nearest labeled-class prototype of the global encoder (cosine);
    per-class quotas over the buckets {ŷ = c} (:func:`class_quotas`);
    per class: the top min(|B_c|, max(1, ⌊4·q_c⌋)) by H̃, then k-center greedy on
    BADGE gradient embeddings anchored on that class's labeled samples.

Every function here reads labels only through :class:`ClientPool`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.active.kcenter import kcenter_greedy
from fedlt_app.active.pool import ClientPool
from fedlt_app.data import to_float
from fedlt_app.models import EncoderClassifier

BALANCE_SEED = 42  # make_balanced_indices' fixed rng seed
INFERENCE_BATCH = 256


# ----------------------------------------------------------------- pass 1


def balanced_indices(labels: np.ndarray, seed: int = BALANCE_SEED) -> np.ndarray:
    """Positions into ``labels`` with every present class oversampled to the largest count.

    ``make_balanced_indices`` verbatim: the largest classes are permuted, the
    others keep all their samples plus draws with replacement; one shuffle.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size == 0:
        return np.empty(0, dtype=np.int64)
    target = int(counts.max())
    parts = []
    for cls, count in zip(classes, counts, strict=True):
        own = np.flatnonzero(labels == cls)
        if count >= target:
            parts.append(rng.choice(own, size=target, replace=False))
        else:
            parts.append(np.concatenate([own, rng.choice(own, size=target - count, replace=True)]))
    balanced = np.concatenate(parts).astype(np.int64)
    rng.shuffle(balanced)
    return balanced


def divergence(global_mean: np.ndarray, local_mean: np.ndarray) -> float:
    """d_k = mean over all classes of |ḡ_c − ℓ̄_c| / (ḡ_c + ℓ̄_c) (a class both give 0 mass adds 0)."""
    g = np.asarray(global_mean, dtype=np.float64)
    l = np.asarray(local_mean, dtype=np.float64)  # noqa: E741
    total = g + l
    terms = np.divide(np.abs(g - l), total, out=np.zeros_like(total), where=total > 0)
    return float(terms.mean())


def imbalance_indicator(global_mean: np.ndarray, present: Sequence[int]) -> float:
    """r_k = min / max of ḡ over the client's labeled classes, in (0, 1]."""
    values = np.asarray(global_mean, dtype=np.float64)[np.asarray(present, dtype=np.int64)]
    if values.size == 0:
        raise ValueError("r_k needs at least one labeled class")
    return float(values.min() / values.max()) if values.max() > 0 else 1.0


@dataclass(frozen=True)
class QueryModels:
    """Which network each part of the query uses (True: the global model)."""

    uncertainty_global: bool
    gradient_global: bool


def query_score(d: float, r_bar: float, t: float = 0.5) -> float:
    """1 − (1−t)(d + r̄) + (1−2t)·d·r̄, which at t = 0.5 is 1 − (d + r̄)/2."""
    return 1.0 - (1.0 - t) * (d + r_bar) + (1.0 - 2.0 * t) * d * r_bar


def choose_models(
    d: float, r_bar: float, t: float = 0.5, global_threshold: float = 0.75, gradient_threshold: float = 0.5
) -> QueryModels:
    """FairFAL's rule (fairfal_sampling.py l.82-94); both thresholds are strict."""
    return QueryModels(
        uncertainty_global=query_score(d, r_bar, t) > global_threshold,
        gradient_global=r_bar < gradient_threshold,
    )


# ------------------------------------------------------------ inference


@torch.no_grad()
def forward(model: EncoderClassifier, images: Tensor, dataset: str) -> tuple[Tensor, Tensor]:
    """(logits, features h) of uint8 ``images``, in eval mode, on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, features = [], []
    for start in range(0, len(images), INFERENCE_BATCH):
        h = model.encoder(to_float(images[start : start + INFERENCE_BATCH].to(device), dataset))
        features.append(h.float().cpu())
        logits.append(model.classifier(h).float().cpu())
    model.train(was_training)
    if not logits:
        return torch.empty(0, model.num_classes), torch.empty(0, model.feature_dim)
    return torch.cat(logits), torch.cat(features)


def balanced_mean_probabilities(logits: Tensor, balanced: np.ndarray) -> np.ndarray:
    """Mean softmax over a balanced resample (positions may repeat)."""
    return torch.softmax(logits[torch.from_numpy(balanced)], dim=1).mean(dim=0).double().numpy()


def normalised_entropy(probs: Tensor) -> Tensor:
    """H̃ = −Σ p log p / log C, with the code's +1e-12 inside the log."""
    return -(probs * (probs + 1e-12).log()).sum(dim=1) / math.log(probs.shape[1])


# ----------------------------------------------------- pseudo-labels, embeddings


def class_prototypes(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean of the L2-normalised features, and the per-class counts."""
    normalised = F.normalize(features.float(), dim=1)
    prototypes = torch.zeros(num_classes, features.shape[1])
    counts = torch.zeros(num_classes)
    prototypes.index_add_(0, labels, normalised)
    counts.index_add_(0, labels, torch.ones(len(labels)))
    present = counts > 0
    prototypes[present] /= counts[present, None]
    return prototypes, counts


def prototype_pseudo_labels(
    features: Tensor, prototypes: Tensor, counts: Tensor, temperature: float = 1.5
) -> tuple[Tensor, Tensor]:
    """(ŷ, q): q = softmax(cos(h, μ_c) / T) with classes lacking labeled samples masked out.

    Only ŷ = argmax q is used by the query, so T does not change the result.
    """
    normalised = F.normalize(features.float(), dim=1)
    centres = F.normalize(prototypes.float(), dim=1)
    similarity = normalised @ centres.T
    similarity = similarity.masked_fill((counts <= 0)[None, :], torch.finfo(similarity.dtype).min)
    probs = torch.softmax(similarity / temperature, dim=1)
    return probs.argmax(dim=1), probs


def gradient_embeddings(features: Tensor, probs: Tensor, targets: Tensor) -> Tensor:
    """BADGE embeddings: block c of sample i is h_i·(1[c = y_i] − p_ic), a C·D float32 vector.

    With p = softmax(W h + b) this is −∂CE(W h + b, y)/∂W_c (the bias excluded).
    """
    coefficient = F.one_hot(targets.long(), probs.shape[1]).float() - probs.float()
    return (coefficient[:, :, None] * features.float()[:, None, :]).reshape(len(features), -1)


# ----------------------------------------------------------- selection


def class_quotas(bucket_sizes: Sequence[int], budget: int) -> np.ndarray:
    """Per-class quotas for a budget over pseudo-label buckets (fairfal_sampling.py l.168-192).

    ⌊b/C⌋ each; the remainder b mod C one each to the largest buckets; capped
    at the bucket size; the capped surplus handed out round-robin over the
    classes (largest buckets first) that still have room. The quotas sum to
    min(b, Σ|B_c|).
    """
    sizes = np.asarray(bucket_sizes, dtype=np.int64)
    num_classes = sizes.size
    budget = int(min(int(budget), int(sizes.sum())))
    base, remainder = divmod(budget, num_classes)
    quota = np.full(num_classes, base, dtype=np.int64)
    order = sorted(range(num_classes), key=lambda c: -sizes[c])  # stable: ties keep class order
    quota[order[:remainder]] += 1
    leftover = int(np.maximum(quota - sizes, 0).sum())
    quota = np.minimum(quota, sizes)
    can_grow = [c for c in order if sizes[c] > quota[c]]
    turn = 0
    while leftover > 0:
        cls = can_grow[turn % len(can_grow)]
        if quota[cls] < sizes[cls]:
            quota[cls] += 1
            leftover -= 1
        turn += 1
    return quota


def candidates(members: np.ndarray, scores: np.ndarray, quota: int, oversample: float) -> np.ndarray:
    """The top min(|B_c|, max(1, ⌊oversample·q_c⌋)) members by score (stable on ties)."""
    size = int(min(members.size, max(1, math.floor(oversample * quota))))
    return members[np.argsort(-scores[members], kind="stable")[:size]]


@dataclass(frozen=True)
class FairFALSettings:
    t: float = 0.5
    global_threshold: float = 0.75
    gradient_threshold: float = 0.5
    oversample: float = 4.0
    temperature: float = 1.5
    distance: str = "euclidean-squared"


def fairfal_statistics(
    pool: ClientPool, global_model: EncoderClassifier, local_model: EncoderClassifier, dataset: str
) -> tuple[float, float]:
    """Pass 1 on one client: (r_k, d_k), given its trained local-only model."""
    images, labels = pool.labeled_data()
    balanced = balanced_indices(labels.numpy())
    global_mean = balanced_mean_probabilities(forward(global_model, images, dataset)[0], balanced)
    local_mean = balanced_mean_probabilities(forward(local_model, images, dataset)[0], balanced)
    return imbalance_indicator(global_mean, np.unique(labels.numpy())), divergence(global_mean, local_mean)


def fairfal_query(
    pool: ClientPool,
    global_model: EncoderClassifier,
    local_model: EncoderClassifier,
    d: float,
    r_bar: float,
    budget: int,
    settings: FairFALSettings,
    dataset: str,
) -> np.ndarray:
    """Pass 2 on one client: the positions to label (into the client's partition)."""
    choice = choose_models(d, r_bar, settings.t, settings.global_threshold, settings.gradient_threshold)
    unlabeled = pool.unlabeled
    labeled_images, labels = pool.labeled_data()
    unlabeled_images = pool.images[torch.from_numpy(unlabeled)]
    num_classes = global_model.num_classes

    global_logits_u, features_u = forward(global_model, unlabeled_images, dataset)
    global_logits_l, features_l = forward(global_model, labeled_images, dataset)
    needs_local = not (choice.uncertainty_global and choice.gradient_global)
    local_logits_u = forward(local_model, unlabeled_images, dataset)[0] if needs_local else None

    uncertainty_logits = global_logits_u if choice.uncertainty_global else local_logits_u
    scores = normalised_entropy(torch.softmax(uncertainty_logits, dim=1)).numpy()

    prototypes, counts = class_prototypes(features_l, labels, num_classes)
    pseudo = prototype_pseudo_labels(features_u, prototypes, counts, settings.temperature)[0].numpy()

    if choice.gradient_global:
        probs_u, probs_l = torch.softmax(global_logits_u, dim=1), torch.softmax(global_logits_l, dim=1)
    else:
        probs_u = torch.softmax(local_logits_u, dim=1)
        probs_l = torch.softmax(forward(local_model, labeled_images, dataset)[0], dim=1)
    anchors = gradient_embeddings(features_l, probs_l, labels).numpy()
    anchor_labels = labels.numpy()

    quota = class_quotas(np.bincount(pseudo, minlength=num_classes), budget)
    chosen: list[np.ndarray] = []
    for cls in range(num_classes):
        members = np.flatnonzero(pseudo == cls)
        if quota[cls] <= 0 or members.size == 0:
            continue
        pool_c = candidates(members, scores, int(quota[cls]), settings.oversample)
        index = torch.from_numpy(pool_c)
        points = gradient_embeddings(features_u[index], probs_u[index], probs_u[index].argmax(dim=1)).numpy()
        picks = kcenter_greedy(points, int(quota[cls]), scores[pool_c], anchors[anchor_labels == cls],
                               settings.distance)
        chosen.append(pool_c[picks])
    selected = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    return np.sort(unlabeled[selected])


def entropy_query(pool: ClientPool, global_model: EncoderClassifier, budget: int, dataset: str) -> np.ndarray:
    """Uncertainty sampling: the ``budget`` unlabeled samples of highest normalised entropy (global model)."""
    unlabeled = pool.unlabeled
    logits = forward(global_model, pool.images[torch.from_numpy(unlabeled)], dataset)[0]
    scores = normalised_entropy(torch.softmax(logits, dim=1)).numpy()
    return np.sort(unlabeled[np.argsort(-scores, kind="stable")[:budget]])


def random_query(pool: ClientPool, budget: int, rng: np.random.Generator) -> np.ndarray:
    """``budget`` unlabeled samples uniformly at random."""
    unlabeled = pool.unlabeled
    return np.sort(rng.choice(unlabeled, size=min(int(budget), unlabeled.size), replace=False))
