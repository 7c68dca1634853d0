"""FedNH (Dai et al., AAAI 2023): class prototypes spread on the sphere, updated smoothly by the server.

The classifier is a set of fixed class prototypes P (one unit vector per
class, ``C × d``) and a scale s: logits = s · cos(h, P_c), the features h
L2-normalised. Clients never train P (it is frozen); they train the encoder
and s with plain cross-entropy, and after training send, per class c they
hold, their count n_{k,c} and n_{k,c} · μ̂_{k,c}, with μ̂_{k,c} the
normalised mean of the normalised features of their class-c samples. The
server averages the model, then moves the prototypes:

    P̄_c = normalise(Σ_k n_{k,c} μ̂_{k,c} / Σ_k n_{k,c})
    P_c ← normalise(ρ · P_c + (1 − ρ) · P̄_c)          (ρ = ``fednh-smoothing``)

and a class no client holds this round keeps its P_c. The new P replaces the
average's in the global model (``ServerMethod.global_model_overrides``), so
it travels with the model and is checkpointed with it.

Source: the authors' code, github.com/Yutong-Dai/FedNH
(``src/flbase/strategies/FedNH.py``, ``FedUH.py``; ``src/flbase/models/CNN.py``:
``Conv2CifarNH``, ``ResNetModNH``; defaults from ``main.py`` and
``experiments/Cifar10_Conv2Cifar.yaml``):

* Initialisation (``FedNH_head_init: orthogonal``, the default):
  ``torch.nn.init.orthogonal_(torch.rand(C, d))``: for C ≤ d the rows are
  orthonormal, every pair of prototypes at 90°, which is how the code
  spreads them on the sphere (its ``uniform`` option exists only for d = 2).
  Every client starts from the same P (the server's, built from client 0's).
* Scale s: a trainable parameter, averaged like the rest, initialised at 1.0
  in ``Conv2CifarNH`` (the CNN of the paper's CIFAR runs) and 20.0 in
  ``ResNetModNH``; ``FedNH_fix_scaling`` (default False) would freeze it at 30.
  fedlt: 20.0 on ``resnet56``, 1.0 on the CNNs, trainable.
* The frozen prototypes are used as stored (unit rows), not re-normalised in
  the forward pass; the features are normalised with a 1e-12 clamp.
* Client semantics: eval mode, the client's whole training set, after local
  training (``_estimate_prototype``; the ``adv`` variants, default off, are
  not implemented).
* ρ = ``FedNH_smoothing`` = 0.9.
* Model averaging: ``server_lr / num_participants · Σ (θ_k − θ)``, i.e. an
  *unweighted* mean over the round's clients (``client_weighting = "uniform"``).
* Personalised accuracy: each client's locally trained model (prototypes as
  received), tested on the test set weighted by its label distribution
  (``labeldist``): ``ClientMethod.personalised_model`` returns that model.

Disagreements with FedLTLib (gzhu-hcai/LongTailLib ``clientfednh.py``,
``serverfednh.py``), where this module follows the official code: FedLTLib
initialises s at 20.0 whatever the backbone (the official CNN uses 1.0) and
hard-codes its own client optimiser (momentum 0, weight decay 1e-5, lr ×0.1
after half the rounds). Flaws not copied: for C > d the code's orthogonal
rows are not unit vectors (``orthogonal_`` then makes the *columns*
orthonormal) and, the prototypes being frozen, they would enter the cosine
unnormalised until the first server update; fedlt normalises the rows at
initialisation (a no-op for C ≤ d). Not copied because fedlt's loop is shared
by every method: weight decay 1e-5, clipping at norm 10 (fedlt: ``grad-clip``),
the learning-rate schedule.

Secure aggregation (``secure-aggregation=secagg``): the server needs only sums, the clients' deltas with
weight 1 each and, per class, Σ_k n_{k,c} μ̂_{k,c} and Σ_k n_{k,c} (``sum_segments``; the plain path sums
the same terms), so it learns the cohort's per-class sample counts but no client's semantics or counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.methods.base import ClientMethod, ClientReport, Payload, ServerMethod, SumSpec
from fedlt_app.methods.class_sums import summed
from fedlt_app.methods.features import encoder_features
from fedlt_app.models import Bottleneck, EncoderClassifier
from fedlt_app.precision import precision_for

PROTOTYPE_KEY = "classifier.prototype"  # the prototypes' entry in the model's travelling state
SCALED_MEANS = "fednh-scaled-means"  # n_{k,c} · μ̂_{k,c}, C × d
COUNTS = "fednh-counts"  # n_{k,c}, C
SCALE_CNN, SCALE_RESNET = 1.0, 20.0  # Conv2CifarNH / ResNetModNH's initial s
NORM_EPS = 1e-12  # the code's clamp on every norm


def orthogonal_prototypes(num_classes: int, dim: int) -> Tensor:
    """The code's initial prototypes, ``orthogonal_(rand(C, d))``, each row then scaled to unit length.

    Draws from the global RNG, like the rest of the model's initialisation.
    """
    prototypes = nn.init.orthogonal_(torch.rand(num_classes, dim))
    return prototypes / prototypes.norm(dim=1, keepdim=True).clamp(min=NORM_EPS)


def unit_rows(x: Tensor) -> Tensor:
    """Each row divided by its L2 norm (clamped at 1e-12, so a zero row stays zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS)


class PrototypeClassifier(nn.Module):
    """logits = s · ⟨h/‖h‖, P_c⟩: frozen unit prototypes P, trainable scale s."""

    def __init__(self, dim: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.prototype = nn.Parameter(orthogonal_prototypes(num_classes, dim), requires_grad=False)
        self.scale = nn.Parameter(torch.tensor([scale]))

    def forward(self, h: Tensor) -> Tensor:
        return self.scale * (unit_rows(h) @ self.prototype.T)


def add_prototype_classifier(model: EncoderClassifier) -> EncoderClassifier:
    """Replace the linear head by FedNH's prototypes (s = 20 on a ResNet backbone, 1 on the CNNs, as the code)."""
    resnet = any(isinstance(m, Bottleneck) for m in model.encoder.modules())
    model.classifier = PrototypeClassifier(model.feature_dim, model.num_classes, SCALE_RESNET if resnet else SCALE_CNN)
    return model


def class_semantics(features: Tensor, labels: Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_c · normalise(mean of normalised features of class c), n_c) per class, float64; zero rows for absent ones."""
    embedded = unit_rows(features.double().cpu())
    labels = labels.cpu().long()
    counts = torch.bincount(labels, minlength=num_classes).double()
    sums = torch.zeros(num_classes, embedded.shape[1], dtype=torch.float64).index_add_(0, labels, embedded)
    means = unit_rows(sums / counts.clamp(min=1).unsqueeze(1))
    return (means * counts.unsqueeze(1)).numpy(), counts.numpy()


def smoothed_prototypes(prototypes: np.ndarray, scaled_means: list[np.ndarray], counts: list[np.ndarray],
                        smoothing: float) -> np.ndarray:
    """The server's update: normalise(ρ·P + (1−ρ)·normalise(Σ n μ̂ / Σ n)); rows no client holds stay as they are."""
    total = np.sum(counts, axis=0)
    held = total > 0
    average = np.zeros_like(prototypes, dtype=np.float64)
    average[held] = np.sum(scaled_means, axis=0)[held] / total[held, None]
    average = unit_rows(torch.from_numpy(average)).numpy()
    updated = unit_rows(torch.from_numpy(smoothing * prototypes + (1 - smoothing) * average)).numpy()
    return np.where(held[:, None], updated, prototypes)


class FedNHClient(ClientMethod):
    """Cross-entropy on the prototype classifier; after training, reports its per-class semantics."""

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        # The loop trains this very object in place: ``report`` reads the trained model from it.
        self._model, self._images, self._labels = model, images, labels
        self._report: Payload | None = None

    def report(self) -> Payload:
        """n_{k,c} · μ̂_{k,c} and n_{k,c} of the trained model (eval mode, un-augmented local data); computed
        once, after training (``summands`` reads it too)."""
        if self._report is None:
            device = next(self._model.parameters()).device
            features = encoder_features(self._model, self._images, self.cfg.dataset,
                                        precision_for(self.cfg.precision, device))
            scaled, counts = class_semantics(features, self._labels, self.num_classes)
            self._report = {SCALED_MEANS: scaled.astype(np.float32), COUNTS: counts.astype(np.int64)}
        return self._report

    def summands(self) -> Payload:
        """Secure aggregation: the report is already two per-class sums' terms (zero rows for absent classes)."""
        return semantics_summands(self.report())

    def personalised_model(self, model: EncoderClassifier) -> EncoderClassifier:
        """FedNH's personalised model is the client's locally trained one (the code's ``pfl`` accuracy)."""
        return model


def semantics_summands(report: Payload) -> Payload:
    """A client's terms of the per-class sums (its report as sent: float32 semantics, int64 counts)."""
    return {SCALED_MEANS: np.asarray(report[SCALED_MEANS], dtype=np.float64),
            COUNTS: np.asarray(report[COUNTS], dtype=np.int64)}


class FedNHServer(ServerMethod):
    """Unweighted model averaging; the prototypes move by the smoothed average of the clients' semantics."""

    client_weighting = "uniform"  # the code averages the clients' models unweighted (server_lr / num_participants)

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        if not isinstance(model.classifier, PrototypeClassifier):
            raise ValueError("method: 'fednh' needs its prototype classifier "
                             "(methods.fednh.add_prototype_classifier)")
        self.prototypes = model.classifier.prototype.detach().cpu().double().numpy().copy()
        self.updated_classes = 0

    def sum_segments(self) -> dict[str, SumSpec]:
        """Per class: the cohort's summed n_{k,c} μ̂_{k,c} and its summed counts n_{k,c} (exact)."""
        return {SCALED_MEANS: SumSpec(self.prototypes.shape), COUNTS: SumSpec((self.num_classes,), exact=True)}

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        """The smoothed update on plain reports: the very sums secure aggregation would reveal."""
        self.absorb_sums(server_round, summed(self.sum_segments(), (semantics_summands(r.payload) for r in reports)))

    def absorb_sums(self, server_round: int, sums: Payload) -> None:
        counts = np.asarray(sums[COUNTS], dtype=np.float64)
        updated = smoothed_prototypes(self.prototypes, [np.asarray(sums[SCALED_MEANS], dtype=np.float64)], [counts],
                                      self.cfg.fednh_smoothing)
        self.prototypes = updated.astype(np.float32).astype(np.float64)  # exactly what the float32 model holds
        self.updated_classes = int((counts > 0).sum())

    def global_model_overrides(self, server_round: int) -> Payload:
        return {PROTOTYPE_KEY: self.prototypes}

    def round_metrics(self) -> dict[str, float | int]:
        """Classes whose prototype moved this round, and the smallest angle between two prototypes (degrees)."""
        cosines = self.prototypes @ self.prototypes.T
        np.fill_diagonal(cosines, -1.0)
        return {"fednh_updated_classes": self.updated_classes,
                "fednh_min_prototype_angle": float(np.degrees(np.arccos(np.clip(cosines.max(), -1.0, 1.0))))}

    def state_dict(self) -> dict[str, Any]:
        return {"prototypes": self.prototypes.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prototypes = np.asarray(state["prototypes"], dtype=np.float64).copy()

