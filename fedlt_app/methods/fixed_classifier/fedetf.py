"""FedETF (Li et al., ICCV 2023): a synthetic, fixed simplex-ETF classifier.

"No Fear of Classifier Biases: Neural Collapse Inspired Federated Learning
with Synthetic and Fixed Classifier". The classifier is a simplex equiangular
tight frame M ∈ R^{C×C} (unit-norm columns, pairwise cosines −1/(C−1)), built
once and never trained in federated training: every node builds the same one
from a fixed seed, so it never travels. What trains and travels is the
backbone, a projection layer Linear(d, C) with L2 normalisation of its output,
and a learnable temperature β::

    μ = proj(h) / ‖proj(h)‖,   logits = β · Mᵀμ
    loss = CE(logits + log n, y)        (balanced softmax, n: the client's class counts)

The server is plain weighted averaging (β included).

Personalisation (the paper's local adaptation, official ``Client_personalization``):
a copy of the locally trained model alternately fine-tunes, with plain
cross-entropy, the ETF alone (SGD lr 0.1, no momentum) and the projection alone
(SGD lr 0.05, momentum 0.9), 3 epochs each, 20 times. Both steps run through
fedlt's one local loop (``train_locally``) with the other parameters frozen.
``fedetf-finetune`` says when: ``last-round`` (default; the official code
fine-tunes once, after the last round), ``every-round`` or ``off``; in the
other rounds the personalised model is the locally trained model itself, as
the official per-round ``peracc`` (each client's model after local training).

Source: the authors' code, github.com/ZexiLee/ICCV-2023-FedETF
(``models_dict/proto_classifiers.py``: the ETF; ``models_dict/resnet.py``:
``linear_proto``, feature normalisation, ``scaling_train``; ``client_funct.py``:
``balanced_softmax_loss``, ``client_fedetf``, ``Client_personalization``).
Defaults: β₀ = 1.0 (the ResNets' ``scaling_train``), 20 alternations of 3 + 3
epochs at lr 0.1 / 0.05. README "Methods" lists where fedlt departs from the
official code and from FedLTLib's port.

Secure aggregation (``secure-aggregation=secagg``): the server needs only the weighted model sum; each
client's personalised accuracy travels inside the masked vector, so the server learns the cohort's mean.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.methods.base import ClientMethod, Payload, ServerMethod
from fedlt_app.models import EncoderClassifier
from fedlt_app.train import LocalTraining, train_locally

ETF_SEED = 0x45544621  # "ETF!": fixed, so the server and every client (any process) build the same ETF
FINE_TUNE = "fedetf-finetune"  # in the broadcast of the rounds whose clients fine-tune their personal model
FINE_TUNING_PLAN = "personal fine-tuning (fedetf-finetune)"  # round_plan's entry: a resume keeps it


def simplex_etf(dim: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """M = √(C/(C−1)) · P (I − 11ᵀ/C), P ∈ R^{dim×C} with orthonormal columns (QR of a uniform draw).

    Columns have unit norm and pairwise cosines −1/(C−1): the official ``Proto_Classifier``.
    """
    if dim < num_classes:
        raise ValueError(f"a simplex ETF of {num_classes} classes needs dim >= {num_classes}, got {dim}")
    p, _ = torch.linalg.qr(torch.rand(dim, num_classes, generator=generator, dtype=torch.float64))
    centring = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    return (math.sqrt(num_classes / (num_classes - 1)) * p @ centring).float()


class L2Normalise(nn.Module):
    """μ = x / max(‖x‖, 1e-12) per row (the official feature normalisation)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2.0, dim=1, eps=1e-12)


class ETFClassifier(nn.Module):
    """logits = β · μ M: a fixed ETF ``etf`` (not in the state dict: never sent) and a learnable β."""

    def __init__(self, dim: int, num_classes: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("etf", simplex_etf(dim, num_classes, torch.Generator().manual_seed(ETF_SEED)),
                             persistent=False)
        self.temperature = nn.Parameter(torch.tensor([float(temperature)]))

    def forward(self, features: Tensor) -> Tensor:
        return self.temperature * (features @ self.etf)

    def make_etf_trainable(self) -> nn.Parameter:
        """Turn the ETF into a parameter (personal fine-tuning only, on a copy that never travels)."""
        self.etf = nn.Parameter(self.etf.detach().clone())
        return self.etf


def add_etf_classifier(model: EncoderClassifier) -> EncoderClassifier:
    """The official head: projection Linear(d, C) and L2 normalisation appended to the encoder; ETF classifier.

    As the official ResNets (``linear_proto``: 64·expansion → C, ``Proto_Classifier(C, C)``), the ETF
    lives in R^C. The backbone keeps its parameter names and, under one seed, its initial values.
    """
    encoder = model.encoder if isinstance(model.encoder, nn.Sequential) else nn.Sequential(model.encoder)
    encoder.add_module("projection", nn.Linear(model.feature_dim, model.num_classes))
    encoder.add_module("normalise", L2Normalise())
    model.encoder = encoder
    model.classifier = ETFClassifier(model.num_classes, model.num_classes)
    model.feature_dim = model.num_classes
    return model


def balanced_softmax_loss(logits: Tensor, labels: Tensor, log_counts: Tensor) -> Tensor:
    """CE(logits + log n, y): the official ``balanced_softmax_loss`` (log n a row vector)."""
    return F.cross_entropy(logits + log_counts, labels)


def local_log_counts(labels: Tensor, num_classes: int) -> Tensor:
    """log n_c of the client's labels, a class it lacks counted as 1 (log 1 = 0), as the official code."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes).clamp(min=1)
    return counts.double().log().float()


def _train_only(model: nn.Module, params: list[nn.Parameter]) -> None:
    keep = {id(p) for p in params}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)


def fine_tune(model: EncoderClassifier, images: Tensor, labels: Tensor, cfg: RunConfig,
              generator: torch.Generator) -> EncoderClassifier:
    """A copy of ``model`` fine-tuned as the official ``Client_personalization``: ETF, then projection, alternately.

    Plain cross-entropy (``ClientMethod``'s loss), fedlt's local loop and clipping; a fresh SGD per step.
    """
    personal = copy.deepcopy(model)
    assert isinstance(personal.classifier, ETFClassifier)
    etf = personal.classifier.make_etf_trainable()
    projection = list(personal.encoder.get_submodule("projection").parameters())
    cross_entropy = ClientMethod(cfg, personal.num_classes, {})
    steps = (([etf], cfg.fedetf_finetune_etf_lr, 0.0), (projection, cfg.fedetf_finetune_projection_lr, cfg.momentum))
    for _ in range(cfg.fedetf_finetune_rounds):
        for params, lr, momentum in steps:
            _train_only(personal, params)
            setup = LocalTraining(cfg.fedetf_finetune_epochs, cfg.batch_size, lr, momentum, cfg.grad_clip, 0.0,
                                  cfg.dataset, cfg.precision, cfg.weight_decay)
            train_locally(personal, images, labels, cross_entropy, setup, generator)
    _train_only(personal, [])
    return personal.eval()


class FedETFClient(ClientMethod):
    """Balanced softmax on β·Mᵀμ; the personal model is the local one, fine-tuned where the server asks."""

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        device = next(model.parameters()).device
        self.log_counts = local_log_counts(labels, self.num_classes).to(device)
        self.images, self.labels = images, labels  # for the personal fine-tuning, after training
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.fine_tune_generator = torch.Generator().manual_seed(seed)

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        return balanced_softmax_loss(model(x), y, self.log_counts)

    def personalised_model(self, model: EncoderClassifier) -> EncoderClassifier | None:
        if FINE_TUNE not in self.payload:
            return model  # the official per-round peracc: the model after local training
        return fine_tune(model, self.images, self.labels, self.cfg, self.fine_tune_generator)


class FedETFServer(ServerMethod):
    """Weighted averaging (β included); asks for the personal fine-tuning in the rounds ``fedetf-finetune`` names."""

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        if not isinstance(model.classifier, ETFClassifier):
            raise ValueError("method: 'fedetf' needs its ETF classifier (methods.fedetf.add_etf_classifier)")
        with torch.no_grad():  # β₀: the server's initial model is the only one built from the config
            model.classifier.temperature.fill_(cfg.fedetf_temperature)
        self.temperature = cfg.fedetf_temperature

    @classmethod
    def round_plan(cls, cfg: RunConfig, server_round: int) -> dict[str, Any]:
        return {FINE_TUNING_PLAN: cfg.fedetf_finetune == "every-round" or (
            cfg.fedetf_finetune == "last-round" and server_round == cfg.num_server_rounds)}

    def fine_tunes(self, server_round: int) -> bool:
        return self.round_plan(self.cfg, server_round)[FINE_TUNING_PLAN]

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        return {FINE_TUNE: np.ones(1, dtype=np.int8)} if self.fine_tunes(server_round) else {}

    def evaluation_model(self, global_model: EncoderClassifier) -> EncoderClassifier:
        assert isinstance(global_model.classifier, ETFClassifier)
        self.temperature = float(global_model.classifier.temperature.detach()[0])
        return global_model

    def round_metrics(self) -> dict[str, float | int]:
        """The global model's learnt temperature β."""
        return {"fedetf_temperature": self.temperature}
