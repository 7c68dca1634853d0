"""RedGrape: decentralized decoupled training (Yang et al., TMLR 2024).

Client k trains the encoder P, the classifier W and a supplementary classifier
Ŵ on the summed logits ``Wᵀh + Ŵᵀh`` (Eq. 7), so Ŵ soaks up the head-class
bias of instance-balanced training.  W alone additionally takes a re-balancing
step along a class-balanced gradient (Eqs. 9, 12, 13)::

    g_bal = (Σ_{c ∈ L_bal} ∇_W CE(W; P, T samples of c) + Σ_{c ∉ L_bal} g_pro[c]) / C
    W ← W − η·λ·g_bal·‖g_local‖/‖g_bal‖      (per tensor, after the local step)

where L_bal are the classes with at least T local samples and g_pro[c] the
global gradient prototypes.  ``rebalance-step=combined`` follows the paper's
Eq. 13 instead: the re-balancing term λ·g_bal·‖g_local‖/‖g_bal‖ is added to
W's gradient, so it is clipped and goes through SGD-momentum with it (with
momentum 0.9 the plain step moves W about ten times less far than the
instance-balanced term it is matched to).  Each client also reports its own prototypes
(Eq. 11): the gradient of the class-mean cross-entropy w.r.t. W and its bias,
on the received model.  The server averages them per class over the clients
that have the class and keeps last round's value where none does (Eq. 15).
Inference uses P and W only: Ŵ lives in ``model.supplementary``, which the
model's ``forward`` never calls.

Where the paper is vague this follows the authors' released code (see
../shared/PAPER.md): prototypes on the received model in eval mode over every
local sample, a balanced set drawn once per round, per-tensor norm matching
before clipping, a plain (momentum-free, unclipped) extra step on W, no
re-balancing before the first prototypes exist.  Unlike that code, gradients
are zeroed every step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData, augment
from fedlt_app.methods.base import ClientMethod, ClientReport, Payload, ServerMethod, SumSpec
from fedlt_app.methods.class_sums import class_means, class_sum_segments, class_summands, summed
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import full_precision

PROTO_KEYS = ("proto-weight", "proto-bias")
HOLDERS_KEY = "proto-holders"  # per class, how many of the round's clients hold it (a sum under secagg)


def prototype_summands(num_classes: int, report: Payload) -> Payload:
    """A client's prototype report as the dense terms whose sums Eq. 15 needs (``class_sums``)."""
    return class_summands(num_classes, report["proto-classes"], {k: report[k] for k in PROTO_KEYS}, HOLDERS_KEY)


def add_supplementary_classifier(model: EncoderClassifier) -> EncoderClassifier:
    """Attach Ŵ, a training-only twin of W."""
    model.supplementary = nn.Linear(model.feature_dim, model.num_classes)
    return model


def two_head_logits(model: EncoderClassifier, x: Tensor) -> Tensor:
    """Wᵀh + Ŵᵀh, in float32 like every model's logits."""
    h = model.encoder(x)
    return (model.classifier(h) + model.supplementary(h)).float()


@torch.no_grad()
def gradient_prototypes(features: Tensor, labels: Tensor, classifier: nn.Linear) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class gradient of the class-mean CE w.r.t. (W, b), analytically.

    For one sample, ∂CE/∂W = (softmax(Wh + b) − e_y) hᵀ and ∂CE/∂b = softmax − e_y;
    averaging those over a class's samples gives its prototype.
    Returns (classes present, weight grads (k, C, d), bias grads (k, C)).
    Always float32, whatever the run's precision: the features may come from
    an autocast pass, the prototypes are state that the server averages.
    """
    with full_precision(features.device.type):
        return _gradient_prototypes(features.float(), labels, classifier)


def _gradient_prototypes(features: Tensor, labels: Tensor, classifier: nn.Linear) -> tuple[Tensor, Tensor, Tensor]:
    residual = torch.softmax(classifier(features), dim=1)
    residual[torch.arange(len(labels)), labels] -= 1.0
    classes = torch.unique(labels)
    weight_grads, bias_grads = [], []
    for c in classes:
        members = labels == c
        weight_grads.append(residual[members].T @ features[members] / members.sum())
        bias_grads.append(residual[members].mean(dim=0))
    return classes, torch.stack(weight_grads), torch.stack(bias_grads)


def mix_balanced_gradient(
    local_grad: Tensor | None,
    num_local_classes: int,
    missing_prototypes: Tensor | None,
    num_missing_classes: int,
    num_classes: int,
) -> Tensor:
    """Eq. 12 for one tensor of W.

    ``local_grad`` is the CE gradient on the whole balanced set, i.e. the mean
    of the per-class gradients over L_bal; ``missing_prototypes`` stacks the
    global prototypes the client has for the classes outside L_bal. A missing
    class the server has no prototype for yet counts as their mean (as in the
    authors' code), so the sum over missing classes is ``count × mean``.
    """
    total = torch.zeros(())
    if local_grad is not None:
        total = total + num_local_classes * local_grad
    if missing_prototypes is not None and len(missing_prototypes):
        total = total + num_missing_classes * missing_prototypes.mean(dim=0)
    return total / num_classes


def norm_matched(direction: Tensor, reference: Tensor) -> Tensor:
    """Rescale ``direction`` to ``reference``'s norm (zero stays zero)."""
    norm = direction.norm()
    if norm == 0:
        return torch.zeros_like(direction)
    return direction * (reference.norm() / norm)


class RedGrapeClient(ClientMethod):
    """Client side: two-head local loss, re-balancing step on W, prototypes."""

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        device = next(model.parameters()).device
        dataset = self.cfg.dataset
        self._prototypes = self._local_prototypes(model, images, labels, generator, device)
        self._rebalance = self.cfg.rebalance_lambda > 0 and "proto-mask" in self.payload
        if not self._rebalance:
            return
        counts = torch.bincount(labels, minlength=self.num_classes)
        threshold = self.cfg.balance_threshold
        sufficient = (counts >= threshold).nonzero().flatten().tolist()
        picks = [
            (labels == c).nonzero().flatten()[torch.randperm(int(counts[c]), generator=generator)[:threshold]]
            for c in sufficient
        ]
        self._num_local = len(sufficient)
        if picks:
            chosen = torch.cat(picks)
            self._balanced_x = augment(images[chosen].to(device), dataset, generator, self.cfg.augment)
            self._balanced_y = labels[chosen].to(device)
        missing = torch.ones(self.num_classes, dtype=torch.bool)
        missing[sufficient] = False
        self._num_missing = int(missing.sum())
        known = missing & torch.from_numpy(self.payload["proto-mask"]).bool()
        self._missing_prototypes = [
            torch.from_numpy(self.payload[key])[known].to(device) if known.any() else None for key in PROTO_KEYS
        ]

    def _local_prototypes(
        self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator, device: torch.device
    ) -> Payload:
        """Eq. 11 on the received model, over every local sample, W-only logits."""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            features = torch.cat(
                [
                    model.encoder(
                        augment(images[i : i + 256].to(device), self.cfg.dataset, generator, self.cfg.augment)
                    )
                    for i in range(0, len(images), 256)
                ]
            )
        model.train(was_training)
        classes, weight_grads, bias_grads = gradient_prototypes(features, labels.to(device), model.classifier)
        return {
            "proto-classes": classes.cpu().numpy().astype(np.int64),
            "proto-weight": weight_grads.cpu().numpy(),
            "proto-bias": bias_grads.cpu().numpy(),
        }

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(two_head_logits(model, x), y)

    def before_step(self, model: EncoderClassifier) -> None:
        if not self._rebalance:
            return
        head = model.classifier
        local_grads: list[Tensor | None] = [None, None]
        if self._num_local:
            with torch.no_grad():
                features = model.encoder(self._balanced_x)  # under the run's autocast
            with full_precision(features.device.type):  # the small head gradient in float32
                balanced_loss = F.cross_entropy(head(features.float()), self._balanced_y)
                local_grads = list(torch.autograd.grad(balanced_loss, [head.weight, head.bias]))
        self._step = []
        for param, local, missing in zip((head.weight, head.bias), local_grads, self._missing_prototypes, strict=True):
            g_bal = mix_balanced_gradient(local, self._num_local, missing, self._num_missing, self.num_classes)
            self._step.append(norm_matched(g_bal.to(param.grad.dtype), param.grad))
        if self.cfg.rebalance_step == "combined":  # Eq. 13: g_local + λ·g_bal·‖g_local‖/‖g_bal‖ -> optimizer
            with torch.no_grad():
                for param, step in zip((head.weight, head.bias), self._step, strict=True):
                    param.grad.add_(self.cfg.rebalance_lambda * step)

    @torch.no_grad()
    def after_step(self, model: EncoderClassifier) -> None:
        """The authors' code: W ← W − η·λ·(norm-matched g_bal), after the optimizer's step."""
        if not self._rebalance or self.cfg.rebalance_step != "plain":
            return
        scale = self.cfg.local_lr * self.cfg.rebalance_lambda
        for param, step in zip((model.classifier.weight, model.classifier.bias), self._step, strict=True):
            param.sub_(scale * step)

    def report(self) -> Payload:
        return self._prototypes

    def summands(self) -> Payload:
        return prototype_summands(self.num_classes, self.report())


class RedGrapeServer(ServerMethod):
    """Server side: the persistent per-class store of global gradient prototypes."""

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        shape = tuple(model.classifier.weight.shape)
        self.weight = np.zeros((self.num_classes, *shape), dtype=np.float32)
        self.bias = np.zeros((self.num_classes, shape[0]), dtype=np.float32)
        self.known = np.zeros(self.num_classes, dtype=bool)

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        if not self.known.any():
            return {}
        return {"proto-weight": self.weight, "proto-bias": self.bias, "proto-mask": self.known}

    def summands_of(self, report: Payload) -> Payload:
        """What a client with this report contributes to ``sum_segments`` (its ``ClientMethod.summands``)."""
        return prototype_summands(self.num_classes, report)

    def sum_segments(self) -> dict[str, SumSpec]:
        """Per class: the holders' summed prototypes and the number of holders (Eq. 15 is their ratio)."""
        return class_sum_segments(self.num_classes, {"proto-weight": self.weight.shape[1:],
                                                     "proto-bias": self.bias.shape[1:]}, HOLDERS_KEY)

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        """Eq. 15 on plain reports: the very sums secure aggregation would reveal."""
        self.absorb_sums(server_round, summed(self.sum_segments(), (self.summands_of(r.payload) for r in reports)))

    def absorb_sums(self, server_round: int, sums: Payload) -> None:
        """Eq. 15: unweighted mean over the clients that hold the class; last value kept where none does."""
        fresh, means = class_means(sums, PROTO_KEYS, HOLDERS_KEY)
        self.weight[fresh] = means["proto-weight"]
        self.bias[fresh] = means["proto-bias"]
        self.known |= fresh

    def round_metrics(self) -> dict[str, float | int]:
        return {"classes_with_prototype": int(self.known.sum())}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias, "known": self.known}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.weight, self.bias, self.known = state["weight"], state["bias"], state["known"]
