"""MOON: model-contrastive federated learning (Li, He & Song, CVPR 2021).

Each client adds to its cross-entropy a contrastive term on the projected
representation z of every sample: z should agree with the representation of
the global model it received this round (the positive) and move away from
that of its own previous local model (the negative)::

    ℓ_con = −log( e^{sim(z, z_glob)/τ} / (e^{sim(z, z_glob)/τ} + e^{sim(z, z_prev)/τ}) )
    loss  = CE(logits, y) + μ · mean over the batch of ℓ_con

with sim the cosine similarity, z_glob and z_prev computed without gradient
by frozen copies in eval mode (the global model as received, the client's
model as it left its previous round of training). The server is plain
weighted averaging; the projection head is part of the model and is averaged
and sent like the rest.

Source: the authors' code, github.com/QinbinLi/MOON (``main.py``:
``train_net_fedcon`` and the ``alg == 'moon'`` loop; ``model.py``:
``ModelFedCon``). Defaults: τ = 0.5 (``--temperature``), μ = 1
(``--mu``; the paper's CIFAR-10 setting and the README example use 5),
out_dim = 256, one previous model (``--model_buffer_size 1``).

Architecture. ``ModelFedCon`` is features h → projection MLP
(Linear(d, d), ReLU, Linear(d, 256)) → z → classifier Linear(256, C): the
classifier reads the *projected* z, and z is what the contrastive term
compares. fedlt's models are ``classifier(encoder(x))``, so the MLP is
appended to the encoder's ``nn.Sequential`` (``add_projection_head``): the
encoder outputs z, ``feature_dim`` becomes 256 and the classifier is a fresh
Linear(256, C). The backbone keeps its parameter names and, under one seed,
its initial values, so a MOON run stays paired with the other methods' runs
up to the head.

Previous model. The official loop keeps every party's model after its last
local training (a FIFO pool of one snapshot of all parties), so the negative
is the client's own local model from the last round it took part in. Here it
is the client's trained model saved in its node's persistent state
(``ClientMethod.state``). In round 1 the official pool is empty: the
contrastive logits are the positive alone, cross-entropy over one logit is 0
and the term vanishes (plain FedAvg+CE). fedlt does the same whenever a
client has no previous model: its first round, after a failed round, and the
first round after ``resume-from`` (a new Flower run starts new client states).

Disagreements and flaws, and what this module does:

* Representation. FedLTLib (gzhu-hcai/LongTailLib,
  ``system/flcore/clients/clientmoon.py``) has no projection head: it
  contrasts the backbone's features (``BaseHeadSplit.base``) and classifies
  them directly. We follow the official code (projection head, classifier
  on z).
* Defaults. FedLTLib reads μ and τ from options it shares with FedProx and
  FedLC (``--mu`` 0.01, ``--tau`` 1.0); we use the official 1 and 0.5.
* Mode of the frozen models. The official code puts the global and previous
  models in eval mode. FedLTLib's previous model is a deep copy of the
  training model (train mode: dropout on, BatchNorm on batch statistics),
  and its global model is the server's own object in whatever mode the
  server left it. We follow the official code.
* A client's first round after round 1. In the official code a party first
  sampled in a later round (partial participation) contrasts against its own
  never-trained random initialisation (each party's net is built separately,
  so it differs from the global initialisation); FedLTLib uses the round-0
  global model. Neither is a model the client trained; we skip the term, as
  for round 1.
* Loss form. FedLTLib evaluates −log(e^a/(e^a + e^b)) literally; the
  official code (and this module) uses cross-entropy over the two logits
  [a, b], the numerically stable form of the same value.
* Not copied from the official recipe, because fedlt's shared loop applies
  to every method alike: weight decay 1e-5 (fedlt's ``weight-decay`` key, 0 by default), no gradient
  clipping (fedlt clips at ``grad-clip``), and a previous-model buffer
  longer than one (``--model_buffer_size``, default 1).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.methods.base import ClientMethod, ClientReport, ClientState, Payload, ServerMethod, SumSpec
from fedlt_app.methods.class_sums import summed
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import full_precision

PROJECTION_DIM = 256  # the official --out_dim default
PREVIOUS_MODEL = "previous-model/"  # prefix of the previous local model's tensors in the client state
HAS_PREVIOUS = "moon-has-previous"
CONTRASTIVE_LOSS = "moon-contrastive-loss"


def add_projection_head(model: EncoderClassifier) -> EncoderClassifier:
    """``ModelFedCon``'s head: h -> Linear(d, d) -> ReLU -> Linear(d, 256) = z, classifier on z."""
    dim = model.feature_dim
    projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, PROJECTION_DIM))
    encoder = model.encoder if isinstance(model.encoder, nn.Sequential) else nn.Sequential(model.encoder)
    encoder.add_module("projection", projection)  # appended: the backbone's parameter names stay
    model.encoder = encoder
    model.classifier = nn.Linear(PROJECTION_DIM, model.num_classes)
    model.feature_dim = PROJECTION_DIM
    return model


def model_contrastive_loss(z: Tensor, z_global: Tensor, z_previous: Tensor, temperature: float) -> Tensor:
    """Mean over rows of −log(e^{cos(z, z_glob)/τ} / (e^{cos(z, z_glob)/τ} + e^{cos(z, z_prev)/τ})).

    As the official code: cross-entropy over the logits [cos(z, z_glob), cos(z, z_prev)] / τ, target 0.
    """
    logits = torch.stack([F.cosine_similarity(z, z_global, dim=-1), F.cosine_similarity(z, z_previous, dim=-1)], dim=1)
    return F.cross_entropy(logits / temperature, torch.zeros(len(z), dtype=torch.long, device=z.device))


def frozen_copy(model: EncoderClassifier) -> EncoderClassifier:
    """An eval-mode copy without gradients (the official code's global and previous nets)."""
    frozen = copy.deepcopy(model).eval()
    for param in frozen.parameters():
        param.requires_grad_(False)
    return frozen


def previous_model_state(state: ClientState) -> dict[str, Tensor]:
    """The previous local model's state dict, from the client state (empty when there is none)."""
    return {key[len(PREVIOUS_MODEL) :]: torch.from_numpy(value) for key, value in state.items()
            if key.startswith(PREVIOUS_MODEL)}


class MoonClient(ClientMethod):
    """Cross-entropy + μ·model-contrastive term against this client's previous local model."""

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        self.global_model: EncoderClassifier | None = None
        self.previous_model: EncoderClassifier | None = None
        self._contrastive_sum = torch.zeros((), device=next(model.parameters()).device)
        self._contrastive_steps = 0
        previous = previous_model_state(self.state)
        if not previous:  # round 1, as in the official code: the term is exactly 0
            return
        self.global_model = frozen_copy(model)  # the model as received this round
        self.previous_model = frozen_copy(model)
        self.previous_model.load_state_dict(previous)

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        z = model.encoder(x)
        loss = F.cross_entropy(model.classifier(z).float(), y)
        if self.global_model is None or self.previous_model is None:
            return loss
        with torch.no_grad():
            z_global = self.global_model.encoder(x)
            z_previous = self.previous_model.encoder(x)
        with full_precision(x.device.type):  # cosines and the log-sum-exp in float32
            contrastive = model_contrastive_loss(z.float(), z_global.float(), z_previous.float(),
                                                 self.cfg.moon_temperature)
        self._contrastive_sum += contrastive.detach()
        self._contrastive_steps += 1
        return loss + self.cfg.moon_mu * contrastive

    def report(self) -> dict[str, np.ndarray]:
        """Whether the term was on, and its mean over the local steps (for the round's metrics)."""
        mean = float(self._contrastive_sum) / max(self._contrastive_steps, 1)
        return {HAS_PREVIOUS: np.array([self.previous_model is not None], dtype=np.float32),
                CONTRASTIVE_LOSS: np.array([mean], dtype=np.float32)}

    def summands(self) -> Payload:
        """Secure aggregation: the server's two metrics need only a count and a sum over the clients."""
        return moon_summands(self.report())

    def state_to_keep(self, model: EncoderClassifier) -> ClientState:
        """The trained local model: next round's negative."""
        return {PREVIOUS_MODEL + key: value.detach().to("cpu", copy=True).numpy()
                for key, value in model.state_dict().items()}


class MoonServer(ServerMethod):
    """Plain weighted averaging; records how many clients contrasted and their mean term."""

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        self.clients_with_previous = 0
        self.contrastive_loss = 0.0

    def sum_segments(self) -> dict[str, SumSpec]:
        """How many clients contrasted (exact) and the sum of their mean terms."""
        return {HAS_PREVIOUS: SumSpec((1,), exact=True), CONTRASTIVE_LOSS: SumSpec((1,))}

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        """The metrics on plain reports: the very sums secure aggregation would reveal."""
        self.absorb_sums(server_round, summed(self.sum_segments(), (moon_summands(r.payload) for r in reports
                                                                    if HAS_PREVIOUS in r.payload)))

    def absorb_sums(self, server_round: int, sums: Payload) -> None:
        self.clients_with_previous = int(sums[HAS_PREVIOUS][0])
        total = float(sums[CONTRASTIVE_LOSS][0])
        self.contrastive_loss = total / self.clients_with_previous if self.clients_with_previous else 0.0

    def round_metrics(self) -> dict[str, float | int]:
        """The round's count of clients with a previous model, and their mean term (0 when none: the term is 0)."""
        return {"moon_clients_with_previous": self.clients_with_previous,
                "moon_contrastive_loss": self.contrastive_loss}


def moon_summands(report: Payload) -> Payload:
    """A client's terms of the server's two sums: 1 and its mean term if it contrasted, else 0 and 0."""
    contrasted = bool(report[HAS_PREVIOUS][0])
    term = float(report[CONTRASTIVE_LOSS][0]) if contrasted else 0.0
    return {HAS_PREVIOUS: np.array([int(contrasted)], dtype=np.int64),
            CONTRASTIVE_LOSS: np.array([term], dtype=np.float64)}
