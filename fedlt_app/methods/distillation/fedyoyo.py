"""FedYoYo (Yan et al., ICCV 2025: "You Are Your Own Best Teacher"): augmented self-bootstrap distillation
and distribution-aware logit adjustment.

Each round has two phases, as in the authors' ``main_fedyoyo.py`` (github.com/shanss132/FedYoYo):

1. **Global prior from feature dispersion.** Before training, every client of the round's cohort runs the
   model the round starts from over its un-augmented data (eval mode): per class c, the mean feature μ_c;
   then, over shuffled batches of the local batch size, for each class present in a batch the features
   centred at μ_c, their cosine matrix R (n × n, zero-norm rows counted as cosine 0) and
   eff_c += 1 / max(mean(R), 1e-6) (a class seen once in a batch adds 1). The server sums the clients'
   eff over the cohort on top of a vector of ones, then smooths it: round 1 replaces entries above 1e4 by
   the mean of the others; later rounds take 0.9·previous + 0.1·current and keep the previous value of any
   class whose relative change exceeds 100. The prior is eff / Σ eff. A class whose features are spread
   (many effectively distinct samples) gets a large prior: the prior measures *effective* class size.
2. **Local training.** Each batch is seen twice: the shared (weak) view and a strongly augmented copy
   (random crop with 4-pixel padding, horizontal flip, AutoAugment's CIFAR-10 policy, Cutout 16 before
   normalisation). Before each step the client moves its prior toward its own label distribution,
   π ← (1 − γ)·π + γ·π_local, and adds log(π^τ + 1e-9) to both views' logits (DLA). The loss is the
   cross-entropy of both adjusted views plus λ·min(r / warmup, 1) times the KL divergence from the weak
   view's softened prediction (teacher, detached) to the strong view's (student), temperature T, averaged
   over the samples whose weak view is classified correctly (ASD). The server averages the models (FedAvg)
   and evaluates the plain logits.

Defaults are the authors' script (``fedyoyo.sh``: λ 4.0, γ 0.1, warmup 50) and argparse (T 1.5, τ 1.5).

Deviations, each forced by fedlt's shared loop or data and none changing the method's rules:

* The optimizer is fedlt's shared one (``local-lr``, ``momentum``, ``grad-clip``); the authors use plain
  SGD (no momentum) at lr 0.1, batch 32, 10 local epochs: set those keys to reproduce them.
* The weak view is the loop's shared view (``fedlt_app.data.augment``), so FedYoYo's teacher sees exactly
  the batches every other method sees; the authors' weak view adds a 15° random rotation, and on
  MNIST-type data fedlt's shared view is the un-augmented image (the authors' data sets are all 32×32
  colour). The strong view is drawn from the method's own stream, never the shared one.
* The strong view uses torchvision's ``AutoAugment(CIFAR10)`` policy, the same sub-policies as the
  ``CIFAR10Policy`` the authors copy from the AutoAugment port; on one-channel images the colour
  operations act on the grey level.
* The KL term is 0 when no weak view of the batch is classified correctly (the authors' code computes a
  0/0 NaN there and replaces it by 0: the same value).

fedlt's fix, off by default (``fedyoyo-cap-effective``): a batch's eff_c is capped at the class's number of
samples in it. In the authors' rule a client's only two samples of a class, centred at their own mean, are exactly
opposite, their mean cosine 0 is floored at 1e-6 and they add 1e6 to eff_c; the server's 100x change limit stops
that only for classes whose eff is below ~1,000, so a head class that one client holds twice can take most of the
prior for tens of rounds (seen on the converged protocol, README).

Secure aggregation (``secure-aggregation=secagg``): the server needs only Σ eff over the cohort, so the first
phase runs as a protocol instance of its own before the train round's (the cohort answers its dense eff vector
masked, ``statistics_summands``; ``statistics_sum_segments``), and the server learns the cohort's sum, not
any client's dispersion. The plain path absorbs the same sum.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.data.transforms import CROP_PADDING, CUTOUT_SIZE, to_float
from fedlt_app.methods.base import ClientMethod, ClientReport, Payload, ServerMethod, SumSpec
from fedlt_app.methods.features import encoder_features
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import Precision

PRIOR = "fedyoyo-prior"  # the round's global prior π (broadcast)
ROUND = "fedyoyo-round"  # the round number r, for the distillation warm-up (broadcast)
EFFECTIVE = "fedyoyo-effective"  # a client's per-class effective weights (statistics answer)

COSINE_FLOOR = 1e-6  # the authors' EPS: floor of the mean cosine and of a zero norm product
LOG_FLOOR = 1e-9  # log(π^τ + 1e-9)
FIRST_ROUND_CAP = 1e4  # round 1: entries above this are replaced by the mean of the others
EMA_KEEP = 0.9  # later rounds: 0.9·previous + 0.1·current
CHANGE_LIMIT = 100.0  # ... keeping the previous value where the relative change exceeds 100
CHANGE_EPSILON = 1e-8


# ---------------------------------------------------------------- phase 1: the prior from feature dispersion

def class_feature_means(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """μ_c per class (zero rows for classes the client lacks)."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels.to(features.device), features)
    counts = torch.bincount(labels.cpu(), minlength=num_classes).to(features.device)
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], sums)


def batch_effective_weights(centred: Tensor, labels: Tensor, num_classes: int, cap: bool = False) -> Tensor:
    """One batch's eff_c: 1 / max(mean cosine of the class's centred features, 1e-6); 1 for a single sample.

    ``cap`` (``fedyoyo-cap-effective``, fedlt's fix): at most the class's number of samples in the batch. k unit
    vectors in random directions have a mean cosine near 1/k (the diagonal), so eff ≈ k; a class whose batch
    holds all of a client's samples of it is centred at their own mean and its cosines cancel below that, down
    to a mean of 0 for a client's only two samples (exactly opposite), which the floor turns into 1e6."""
    eff = torch.zeros(num_classes, dtype=torch.float32)
    for c in labels.unique().tolist():
        rows = centred[labels == c]
        if len(rows) == 1:
            eff[c] = 1.0
            continue
        norms = rows.norm(dim=1, keepdim=True)
        norm_products = norms @ norms.T
        norm_products[norm_products == 0] = COSINE_FLOOR
        mean_cosine = float(((rows @ rows.T) / norm_products).mean())
        spread = 1.0 / max(mean_cosine, COSINE_FLOOR)
        eff[c] = min(spread, float(len(rows))) if cap else spread
    return eff


def effective_weights(features: Tensor, labels: Tensor, num_classes: int, batch_size: int,
                      generator: torch.Generator, cap: bool = False) -> Tensor:
    """A client's Σ over shuffled batches of ``batch_size`` of each batch's eff (the authors' eff_all); ``cap``:
    see :func:`batch_effective_weights`."""
    features, labels = features.float().cpu(), labels.long().cpu()
    centred = features - class_feature_means(features, labels, num_classes)[labels]
    total = torch.zeros(num_classes, dtype=torch.float32)
    for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
        total += batch_effective_weights(centred[batch], labels[batch], num_classes, cap)
    return total


def smoothed_effective_weights(current: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
    """The server's smoothing of 1 + Σ_clients eff: the first round caps outliers, later rounds average."""
    current = np.asarray(current, dtype=np.float64).copy()
    if previous is None:
        abnormal = current > FIRST_ROUND_CAP
        if (~abnormal).any():
            current[abnormal] = current[~abnormal].mean()
        return current
    smoothed = EMA_KEEP * previous + (1 - EMA_KEEP) * current
    jumped = np.abs((smoothed - previous) / (previous + CHANGE_EPSILON)) > CHANGE_LIMIT
    smoothed[jumped] = previous[jumped]
    return smoothed


# ---------------------------------------------------------------- phase 2: local training

def strong_view(raw: Tensor, dataset: str, generator: torch.Generator) -> Tensor:
    """The authors' strong augmentation of a uint8 batch, as model input: crop (padding 4), flip, AutoAugment
    (CIFAR-10 policy), Cutout 16 on the [0, 1] image, then the data set's normalisation.

    Every draw comes from ``generator`` (torchvision's transforms use the global RNG, forked here).
    """
    from torchvision.transforms import v2  # imported here: it pulls in torch._dynamo (seconds per process)

    _, _, height, width = raw.shape
    transform = v2.Compose([v2.RandomCrop((height, width), padding=CROP_PADDING), v2.RandomHorizontalFlip(),
                            v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)])
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images = torch.stack([transform(image) for image in raw.cpu()])
        rows = torch.randint(0, height, (len(images),))
        cols = torch.randint(0, width, (len(images),))
    half = CUTOUT_SIZE // 2
    in_rows = (torch.arange(height)[None] >= rows[:, None] - half) & (torch.arange(height)[None] < rows[:, None] + half)
    in_cols = (torch.arange(width)[None] >= cols[:, None] - half) & (torch.arange(width)[None] < cols[:, None] + half)
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    images = images.masked_fill(hole[:, None], 0)  # black in [0, 1] space: Cutout before Normalize
    return to_float(images, dataset).to(raw.device)


def adjusted_logits(logits: Tensor, prior: Tensor, tau: float) -> Tensor:
    """DLA: logits + log(π^τ + 1e-9)."""
    return logits.float() + torch.log(prior.float().pow(tau) + LOG_FLOOR)


def self_distillation(weak: Tensor, strong: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """ASD: KL(softmax(weak/T) ‖ log_softmax(strong/T)), batch-mean over the correctly classified weak views."""
    correct = weak.argmax(dim=1) == labels
    if not bool(correct.any()):
        return weak.new_zeros(())
    teacher = F.softmax(weak[correct].detach() / temperature, dim=1)
    student = F.log_softmax(strong[correct] / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean")


def fedyoyo_loss(logits: Tensor, labels: Tensor, temperature: float, kd_weight: float) -> Tensor:
    """Cross-entropy on both (adjusted) views + ``kd_weight`` · ASD; ``logits`` = [weak; strong] rows."""
    weak, strong = logits.chunk(2)
    cross_entropy = F.cross_entropy(logits, torch.cat([labels, labels]))
    if kd_weight == 0:
        return cross_entropy
    return cross_entropy + kd_weight * self_distillation(weak, strong, labels, temperature)


def distillation_weight(lam: float, server_round: int, warmup: int) -> float:
    """λ · min(r / warmup, 1): the distillation grows linearly over the first ``warmup`` rounds."""
    return lam * min(server_round / warmup, 1.0) if warmup > 0 else lam


class FedYoYoClient(ClientMethod):
    """Weak and strong views of every batch, the prior moved toward the client's labels each step."""

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        device = next(model.parameters()).device
        counts = torch.bincount(labels.reshape(-1).long().cpu(), minlength=self.num_classes).float()
        self.local_distribution = (counts / counts.sum()).to(device)
        if PRIOR not in self.payload:
            raise ValueError("method: 'fedyoyo' clients need the server's prior (payload key fedyoyo-prior)")
        self.prior = torch.from_numpy(np.asarray(self.payload[PRIOR], dtype=np.float32)).to(device)
        server_round = int(np.asarray(self.payload[ROUND]).reshape(-1)[0])
        self.kd_weight = distillation_weight(self.cfg.fedyoyo_lambda, server_round, self.cfg.fedyoyo_warmup)
        self.generator = generator

    def batch_input(self, raw: Tensor, augmented: Tensor) -> Tensor:
        return torch.cat([augmented, strong_view(raw, self.cfg.dataset, self.generator)])

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        gamma = self.cfg.fedyoyo_gamma
        self.prior = (1 - gamma) * self.prior + gamma * self.local_distribution  # once per step, as the authors
        logits = adjusted_logits(self.forward_views(model, x, len(y)), self.prior, self.cfg.fedyoyo_tau)
        return fedyoyo_loss(logits, y, self.cfg.fedyoyo_temperature, self.kd_weight)

    def forward_views(self, model: EncoderClassifier, x: Tensor, n: int) -> Tensor:
        """The logits of [weak; strong], as the authors' one forward of the concatenation, except on a model with
        dropout (fedlt's ``cnn``, ``cnn-mcmahan``): there the shared view goes first, on the global RNG, so its
        dropout masks (and the RNG the next batch finds) are FedAvg's, and the strong view follows on a fork
        seeded from the method's stream. Those models have no batch statistics, so each row's logits depend only
        on its own input and mask: the same computation, the masks paired. Models with BatchNorm
        (``resnet56``, ``cnn4conv``) have no dropout and keep the one forward, so its batch statistics are the
        authors' (both views together)."""
        if not any(isinstance(m, torch.nn.Dropout) for m in model.modules()):
            return model(x)
        weak = model(x[:n])
        device = x.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
            strong = model(x[n:])
        return torch.cat([weak, strong])

    def statistics(self, model: EncoderClassifier, images: Tensor, labels: Tensor, precision: Precision,
                   generator: torch.Generator | None = None) -> Payload:
        """Phase 1: this client's eff per class, on the model the round starts from."""
        if generator is None:
            raise ValueError("FedYoYo's statistics shuffle their batches: pass the query's generator")
        features = encoder_features(model, images, self.cfg.dataset, precision)
        eff = effective_weights(features, labels, self.num_classes, self.cfg.batch_size, generator,
                                self.cfg.fedyoyo_cap_effective)
        return {EFFECTIVE: eff.double().numpy()}

    def statistics_summands(self, model: EncoderClassifier, images: Tensor, labels: Tensor,
                            precision: Precision, generator: torch.Generator | None = None) -> Payload:
        """Secure aggregation: the same eff vector (dense over the classes already), masked."""
        return self.statistics(model, images, labels, precision, generator)


class FedYoYoServer(ServerMethod):
    """The cohort's effective weights before each round's training -> the smoothed prior it broadcasts."""

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        self.previous: np.ndarray | None = None  # last round's smoothed 1 + Σ eff
        self.prior = np.full(self.num_classes, 1.0 / self.num_classes)

    def wants_statistics_before_training(self, server_round: int) -> bool:
        return True

    def absorb_statistics(self, server_round: int, global_model: EncoderClassifier,
                          reports: list[ClientReport]) -> None:
        self.absorb_statistics_sums(server_round, global_model, {EFFECTIVE: sum(
            (np.asarray(r.payload[EFFECTIVE], dtype=np.float64) for r in reports), np.zeros(self.num_classes))})

    def statistics_sum_segments(self) -> dict[str, SumSpec]:
        return {EFFECTIVE: SumSpec((self.num_classes,))}

    def absorb_statistics_sums(self, server_round: int, global_model: EncoderClassifier, sums: Payload) -> None:
        """The prior from the cohort's Σ eff (on top of a vector of ones), smoothed across rounds."""
        current = np.ones(self.num_classes) + np.asarray(sums[EFFECTIVE], dtype=np.float64)
        self.previous = smoothed_effective_weights(current, self.previous)
        self.prior = self.previous / self.previous.sum()

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        return {PRIOR: self.prior.astype(np.float32), ROUND: np.array([server_round], dtype=np.int64)}

    def round_metrics(self) -> dict[str, float | int]:
        """The prior's smallest and largest class share (how far the effective sizes are from uniform)."""
        return {"fedyoyo_prior_min": float(self.prior.min()), "fedyoyo_prior_max": float(self.prior.max())}

    def state_dict(self) -> dict[str, Any]:
        return {"previous": None if self.previous is None else self.previous.copy(), "prior": self.prior.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = None if state.get("previous") is None else np.asarray(state["previous"], dtype=np.float64)
        self.prior = np.asarray(state["prior"], dtype=np.float64)
