"""CReFF (Shang et al., IJCAI 2022): classifier re-training with federated features.

The encoder trains as in FedAvg.  Each round clients also send, per local
class, the gradient of the class-mean cross-entropy w.r.t. the classifier,
computed on the received encoder and the classifier the server broadcasts.
The server keeps 100 learnable "federated features" per class and moves them
(SGD, lr 0.1, 100 steps a round) so that the gradient of that same classifier
on them matches the clients' real gradients — distance Σ_rows (1 − cos) plus
one term for the bias, as the official code's ``distance_wb`` — then
re-trains a fresh linear classifier on the features (SGD at
``creff-retrain-lr``, the official ``lr_net`` = 0.01), and evaluates the
global encoder with that classifier (weight and bias).  Training continues
from the FedAvg model; the re-trained classifier only evaluates and is the
next round's matching head.

The server broadcasts its classifier every round, round 1 included, so the
head the clients compute real gradients at and the head the server matches
at are always the same tensor.  In round 1 that is a freshly drawn
``nn.Linear``, as in the official code (``shangxinyi/CReFF-FL`` ``main.py``:
``syn_params`` starts as a new ``nn.Linear(256, 10)``'s state and replaces
the classifier both in the clients' ``compute_gradient`` and in the server's
``update_feature_syn``); the authors' port instead let round-1 clients use
the global model's classifier while the server matched at a fresh one.

Follows the official implementation where the authors' port drifted: per-row
cosine, only classes reported this round, re-training at lr_net (0.01, not the
port's 0.1 and not the local lr), one shared head in round 1, weight and bias
both replaced.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData, augment
from fedlt_app.methods.base import ClientMethod, ClientReport, Payload, ServerMethod, SumSpec
from fedlt_app.methods.class_sums import class_means, class_sum_segments, class_summands
from fedlt_app.methods.decoupled.redgrape import gradient_prototypes
from fedlt_app.methods.retrain import retrain_linear, with_classifier
from fedlt_app.models import EncoderClassifier

EPS = 1e-6
GRADIENT_KEYS = ("creff-weight", "creff-bias")
HOLDERS_KEY = "creff-holders"  # per class, how many of the round's clients report it (a sum under secagg)


def rowwise_cosine_distance(synthetic: Tensor, real: Tensor) -> Tensor:
    """Σ over rows of (1 − cos); a vector (bias) counts as one row."""
    synthetic, real = synthetic.reshape(-1, synthetic.shape[-1]), real.reshape(-1, real.shape[-1])
    cosine = (synthetic * real).sum(-1) / (synthetic.norm(dim=-1) * real.norm(dim=-1) + EPS)
    return (1 - cosine).sum()


def class_gradient(head: nn.Linear, features: Tensor, label: int) -> tuple[Tensor, Tensor]:
    targets = torch.full((len(features),), label, dtype=torch.long, device=features.device)
    loss = F.cross_entropy(head(features).float(), targets)
    weight, bias = torch.autograd.grad(loss, [head.weight, head.bias], create_graph=True)
    return weight, bias


class CReFFClient(ClientMethod):
    @torch.no_grad()
    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        device = next(model.parameters()).device
        head = copy.deepcopy(model.classifier)
        if "creff-weight" in self.payload:
            head.weight.copy_(torch.from_numpy(self.payload["creff-weight"]))
            head.bias.copy_(torch.from_numpy(self.payload["creff-bias"]))
        model.eval()
        features = torch.cat([
            model.encoder(augment(images[i : i + 256].to(device), self.cfg.dataset, generator, self.cfg.augment))
            for i in range(0, len(labels), 256)
        ])
        classes, weight, bias = gradient_prototypes(features, labels.to(device), head)
        self._report = {
            "creff-classes": classes.cpu().numpy().astype(np.int64),
            "creff-weight": weight.cpu().numpy(),
            "creff-bias": bias.cpu().numpy(),
        }

    def report(self) -> Payload:
        return self._report

    def summands(self) -> Payload:
        """Secure aggregation: the server's per-class mean needs only these sums (``class_sums``)."""
        return class_summands(self.num_classes, self._report["creff-classes"],
                              {k: self._report[k] for k in GRADIENT_KEYS}, HOLDERS_KEY)


class CReFFServer(ServerMethod):
    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        if not isinstance(model.classifier, nn.Linear):
            raise ValueError("method: 'creff' re-trains a linear classifier; this model's head is not nn.Linear")
        self.generator = torch.Generator().manual_seed(cfg.seed + 104729)
        per_class = cfg.creff_features_per_class
        self.feature_labels = torch.arange(self.num_classes).repeat_interleave(per_class)
        self.features = torch.randn(self.num_classes * per_class, model.feature_dim, generator=self.generator)
        self.features.requires_grad_(True)
        self.feature_optimizer = torch.optim.SGD([self.features], lr=cfg.creff_feature_lr)
        self.classifier = self._fresh_classifier(model.feature_dim)
        self.trained = False
        self.last_match_loss = float("nan")

    def _fresh_classifier(self, feature_dim: int) -> nn.Linear:
        """PyTorch's default init, drawn from this method's own generator."""
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator)))
            return nn.Linear(feature_dim, self.num_classes)

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        """The matching head, every round: the clients' real gradients and ``matching_loss`` share it."""
        return {"creff-weight": self.classifier.weight.detach().numpy().copy(),
                "creff-bias": self.classifier.bias.detach().numpy().copy()}

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        self.absorb_real(self.mean_real_gradients(reports))

    def sum_segments(self) -> dict[str, SumSpec]:
        """Per class: the reporting clients' summed real gradients and their number."""
        weight = tuple(self.classifier.weight.shape)
        return class_sum_segments(self.num_classes, {"creff-weight": weight, "creff-bias": weight[:1]}, HOLDERS_KEY)

    def absorb_sums(self, server_round: int, sums: Payload) -> None:
        """``mean_real_gradients`` from the secure sums (classes in increasing order, means from float64 sums)."""
        fresh, means = class_means(sums, GRADIENT_KEYS, HOLDERS_KEY)
        self.absorb_real({int(c): (torch.from_numpy(means["creff-weight"][i]).float(),
                                   torch.from_numpy(means["creff-bias"][i]).float())
                          for i, c in enumerate(np.flatnonzero(fresh))})

    def absorb_real(self, real: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Match the federated features to this round's mean real gradients, then re-train the classifier."""
        self.last_match_loss = self.match_features(real)
        self.classifier = self.retrain_classifier()
        self.trained = True

    def mean_real_gradients(self, reports: list[ClientReport]) -> dict[int, tuple[Tensor, Tensor]]:
        """Unweighted mean per class over the clients that reported it this round."""
        sums: dict[int, list] = {}
        for report in reports:
            payload = report.payload
            for row, c in enumerate(payload["creff-classes"].tolist()):
                entry = sums.setdefault(c, [0.0, 0.0, 0])
                entry[0] = entry[0] + payload["creff-weight"][row]
                entry[1] = entry[1] + payload["creff-bias"][row]
                entry[2] += 1
        return {c: (torch.from_numpy(w / n).float(), torch.from_numpy(b / n).float()) for c, (w, b, n) in sums.items()}

    def matching_loss(self, real: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
        per_class = self.cfg.creff_features_per_class
        total = torch.zeros(())
        for c, (real_weight, real_bias) in real.items():
            synthetic = class_gradient(self.classifier, self.features[c * per_class : (c + 1) * per_class], c)
            total = total + rowwise_cosine_distance(synthetic[0], real_weight)
            total = total + rowwise_cosine_distance(synthetic[1], real_bias)
        return total

    def match_features(self, real: dict[int, tuple[Tensor, Tensor]]) -> float:
        loss = torch.zeros(())
        for _ in range(self.cfg.creff_match_steps):
            self.feature_optimizer.zero_grad(set_to_none=True)
            with self.precision.autocast():
                loss = self.matching_loss(real)
            loss.backward()
            self.feature_optimizer.step()
        return float(loss.detach())

    def retrain_classifier(self) -> nn.Linear:
        """A fresh linear classifier, trained on the (detached) federated features (SGD, no momentum,
        batch 32, ``creff-retrain-epochs`` epochs at ``creff-retrain-lr``)."""
        classifier = self._fresh_classifier(self.features.shape[1])
        retrain_linear(classifier, self.features, self.feature_labels, epochs=self.cfg.creff_retrain_epochs,
                       lr=self.cfg.creff_retrain_lr, batch_size=32, generator=self.generator,
                       precision=self.precision)
        return classifier

    def evaluation_model(self, global_model: EncoderClassifier) -> EncoderClassifier:
        return with_classifier(global_model, self.classifier if self.trained else None)

    def round_metrics(self) -> dict[str, float | int]:
        return {"creff_match_loss": self.last_match_loss}

    def state_dict(self) -> dict[str, Any]:
        return {
            "features": self.features.detach().clone(),
            "feature_optimizer": self.feature_optimizer.state_dict(),
            "classifier": self.classifier.state_dict(),
            "trained": self.trained,
            "generator": self.generator.get_state(),
            "last_match_loss": self.last_match_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.features.copy_(state["features"])
        self.feature_optimizer.load_state_dict(state["feature_optimizer"])
        self.classifier.load_state_dict(state["classifier"])
        self.trained = state["trained"]
        self.generator.set_state(state["generator"])
        self.last_match_loss = state["last_match_loss"]
