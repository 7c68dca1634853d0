"""FedLoGe (Xiao et al., ICLR 2024): a static sparse ETF trains the backbone; global and local heads are realigned.

"FedLoGe: Joint Local and Generic Federated Learning under Long-tailed Data".
Three linear heads sit on the backbone's features h (d-dimensional):

* SSE-C, the static sparse equiangular tight frame classifier ``W_s`` (C × d):
  a simplex ETF (``fedetf.simplex_etf``) in R^d with a random ⌊β·d·C⌋ of its
  entries set to zero (β = ``fedloge-sparsity``, drawn uniformly without
  replacement, not by magnitude), whose surviving entries are then moved by
  ``fedloge-sse-steps`` Adam steps (lr 1e-4) on

      Σ_c (‖w_c‖ − ν)²  −  mean_c arccos(clamp(max_{j≠c} cos(w_c, w_j), ±0.99999))

  (ν = ``fedloge-sse-norm``: class vectors of norm ν as far from their nearest
  neighbour as the pruning allows), the pruned entries held at zero. Built once
  from the run seed by every node, never trained, never sent. Only it trains
  the backbone: CE(h W_sᵀ, y).
* The auxiliary global head ``g_aux`` = Linear(d, C) (fedlt's linear classifier,
  so it starts where FedAvg's does): CE on the *detached* features; averaged by
  the server like the backbone.
* The local head ``l_k`` = Linear(d, C) of client k: CE on the detached
  features; kept on the client's node (``ClientMethod.state``), never sent.

The client's loss is the sum of the three cross-entropies (the backbone's
gradient comes from the first alone; one SGD over backbone, g_aux and l_k is
the official three SGDs of equal lr and momentum).

Realignment (official step 2, ``realignment.py``; no training):

* GHA, the global model: g_aux with every class row rescaled to norm γ
  (γ = ``fedloge-gha-norm``, 1.7), its bias unchanged: ``globaltest_calibra``.
* LA, client k's personalised model: logits = l_k(h) + (ŵ h + b_aux), where
  ŵ_c = ‖l_k,c‖ · w_aux,c (``update_weights_norm_init`` with 0 epochs, then
  ``localtest``), and the classes the client does not hold are masked out.

``fedloge-realign`` says when: ``every-round`` (default: the realignment costs
nothing, so each round reports what step 2 would give on that round's model;
in the last round that is the official step 2), ``last-round``, or ``off``; in
rounds without it the server evaluates the SSE-C model and the personalised
logits are l_k(h) + g_aux(h), masked (the official per-round log of
``fedloge.py``).

The personalised model is the official pairing: the *global* backbone and
g_aux with the client's local head as last trained. Clients see the global
model only when next sampled, so the personalised accuracy a client reports in
round t is that of the global model it received (round t − 1's, the official
round t − 1 local test), with the local head its state held (a fresh head,
drawn like ``nn.Linear``'s initialisation, the first time, as the official
``l_heads``). Each round, backbone + g_aux travel both ways (as many numbers as
FedAvg's model); W_s and l_k never.

Source: github.com/ZackZikaiXiao/FedLoGe (``fedloge.py``, ``realignment.py``,
``util/etf_methods.py``: ``ETF_Classifier.gen_sparse_ETF``;
``util/update_baseline.py``: ``update_weights_gaux``, ``globaltest_calibra``,
``update_weights_norm_init``, ``localtest``). README "Methods" lists where fedlt
departs from the official code and from FedLTLib's port.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.methods.base import ClientMethod, ClientState, Payload, ServerMethod
from fedlt_app.methods.fixed_classifier.fedetf import simplex_etf
from fedlt_app.models import EncoderClassifier

SSE_TAG = 0x53534543  # "SSEC": the SSE-C's seed sequence is (run seed, this tag), the same on every node
SSE_ADAM_LR = 1e-4  # gen_sparse_ETF's Adam
SSE_COS_CLAMP = 0.99999  # gen_sparse_ETF's clamp before arccos
NORM_EPS = 1e-12  # a column (or row) of norm 0 stays 0 instead of dividing by zero
REALIGN = "fedloge-realign"  # in the broadcast of the rounds whose personalised models are realigned (LA)
LOCAL_WEIGHT, LOCAL_BIAS = "fedloge-local-weight", "fedloge-local-bias"  # the client's state: its local head
LOCAL_PREFIX = "classifier.local."  # the local head's entries in the model's state dict: never travel
REALIGNMENT_PLAN = "realignment (fedloge-realign)"  # round_plan's entry: a resume keeps it


# ---------------------------------------------------------------- SSE-C


def sse_objective(w: np.ndarray, target_norm: float) -> tuple[float, np.ndarray]:
    """gen_sparse_ETF's loss on the d × C matrix ``w`` (one class per column) and its gradient.

    Σ_c (n_c − ν)² − mean_c arccos(clamp(max_{j≠c} u_cᵀu_j)), u_c = w_c / n_c. The gradient is the one
    autograd gives the official code: through n_c in both terms, the max only through its argmax, nothing
    where the clamp is active.
    """
    num_classes = w.shape[1]
    norms = np.sqrt((w * w).sum(axis=0))
    units = w / np.maximum(norms, NORM_EPS)
    cosines = units.T @ units
    np.fill_diagonal(cosines, -1.0)
    nearest = cosines.argmax(axis=1)
    largest = cosines[np.arange(num_classes), nearest]
    clamped = np.clip(largest, -SSE_COS_CLAMP, SSE_COS_CLAMP)
    loss = float(((norms - target_norm) ** 2).sum() - np.arccos(clamped).mean())
    # d(−mean arccos(m_c))/dm_c = 1 / (C √(1 − m_c²)), zero where the clamp holds m_c
    slope = np.where(np.abs(largest) <= SSE_COS_CLAMP, 1.0 / (num_classes * np.sqrt(1.0 - clamped ** 2)), 0.0)
    to_nearest = np.zeros((num_classes, num_classes))
    to_nearest[np.arange(num_classes), nearest] = slope
    grad_units = units[:, nearest] * slope + units @ to_nearest  # ∂m_c/∂u_c = u_j*, ∂m_c/∂u_j* = u_c
    radial = (units * grad_units).sum(axis=0)
    grad = (grad_units - units * radial) / np.maximum(norms, NORM_EPS) + 2.0 * (norms - target_norm) * units
    return loss, grad


def sparse_etf(dim: int, num_classes: int, sparsity: float, steps: int, target_norm: float,
               seed: int) -> np.ndarray:
    """The SSE-C as gen_sparse_ETF builds it, d × C float64 (classes in columns).

    A simplex ETF (``simplex_etf``), ⌊β·d·C⌋ entries zeroed uniformly at random without replacement, then
    ``steps`` Adam steps (torch's defaults, lr 1e-4) on ``sse_objective`` with the pruned entries' gradient
    masked, so they stay zero. All draws come from ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    etf = simplex_etf(dim, num_classes, generator).double().numpy()
    pruned = torch.randperm(dim * num_classes, generator=generator)[: int(sparsity * dim * num_classes)].numpy()
    keep = np.ones(dim * num_classes)
    keep[pruned] = 0.0
    keep = keep.reshape(dim, num_classes)
    w = etf * keep
    first, second = np.zeros_like(w), np.zeros_like(w)
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults
    for step in range(1, steps + 1):
        grad = sse_objective(w, target_norm)[1] * keep
        first = beta1 * first + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad * grad
        denominator = np.sqrt(second) / np.sqrt(1 - beta2 ** step) + eps
        w = w - (SSE_ADAM_LR / (1 - beta1 ** step)) * first / denominator
    return w


@functools.lru_cache(maxsize=4)
def _sse_weight(dim: int, num_classes: int, sparsity: float, steps: int, target_norm: float, seed: int) -> Tensor:
    return torch.from_numpy(sparse_etf(dim, num_classes, sparsity, steps, target_norm, seed).T.copy()).float()


def sse_weight(cfg: RunConfig, dim: int, num_classes: int) -> Tensor:
    """The run's SSE-C weight (C × d float32): a pure function of the config, built once per process."""
    seed = int(np.random.SeedSequence([cfg.seed, SSE_TAG]).generate_state(1)[0])
    return _sse_weight(dim, num_classes, cfg.fedloge_sparsity, cfg.fedloge_sse_steps, cfg.fedloge_sse_norm, seed)


# ---------------------------------------------------------------- realignment


def _row_norms(weight: Tensor) -> Tensor:
    return weight.norm(dim=1, keepdim=True)


def global_realignment(aux_weight: Tensor, norm: float) -> Tensor:
    """GHA (``globaltest_calibra``): every class row of g_aux rescaled to norm γ."""
    return aux_weight * (norm / _row_norms(aux_weight).clamp(min=NORM_EPS))


def local_realignment(aux_weight: Tensor, local_weight: Tensor) -> Tensor:
    """LA (``update_weights_norm_init``): g_aux's class rows scaled by the norms of the local head's rows."""
    return aux_weight * _row_norms(local_weight)


# ---------------------------------------------------------------- the network


class FedLoGeHeads(nn.Module):
    """SSE-C (a buffer: never trained, never in the state dict), g_aux and the local head; forward: the SSE-C."""

    def __init__(self, aux: nn.Linear) -> None:
        super().__init__()
        dim, num_classes = aux.in_features, aux.out_features
        self.register_buffer("sse", torch.full((num_classes, dim), float("nan")), persistent=False)
        self.aux = aux
        self.local = nn.Linear(dim, num_classes)
        with torch.no_grad():  # set from the client's state before training (ClientMethod.begin)
            self.local.weight.zero_()
            self.local.bias.zero_()

    def install_sse(self, weight: Tensor) -> None:
        """Put the run's SSE-C in place (each node builds it from the config: ``sse_weight``)."""
        self.sse.copy_(weight)

    def forward(self, h: Tensor) -> Tensor:
        return h @ self.sse.to(h.dtype).T


class FedLoGeModel(EncoderClassifier):
    """FedLoGe's network: its travelling state is everything but the local head (and the SSE-C buffer)."""

    def travelling_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(LOCAL_PREFIX)}

    def load_travelling_state(self, state: Mapping[str, Tensor]) -> None:
        """Strict on every entry but the local head's, which stays as it is."""
        missing, unexpected = self.load_state_dict(dict(state), strict=False)
        wrong = sorted(unexpected) + [k for k in missing if not k.startswith(LOCAL_PREFIX)]
        if wrong or any(k.startswith(LOCAL_PREFIX) for k in state):
            raise KeyError(f"FedLoGe model: travelling state mismatch at {wrong or sorted(state)}")


def add_fedloge_heads(model: EncoderClassifier) -> EncoderClassifier:
    """The backbone, and FedLoGe's heads on its features; the linear classifier becomes g_aux."""
    assert isinstance(model.classifier, nn.Linear)
    return FedLoGeModel(model.encoder, model.feature_dim, model.num_classes, FedLoGeHeads(model.classifier))


class RealignedHead(nn.Module):
    """logits = h Wᵀ + b from fixed tensors (no parameters: building one draws nothing from the global RNG);
    classes outside ``held`` (if given) get −∞."""

    def __init__(self, weight: Tensor, bias: Tensor, held: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        self.register_buffer("held", held.to(bias.device, copy=True) if held is not None
                             else torch.ones(len(bias), dtype=torch.bool, device=bias.device))

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight.to(h.dtype), self.bias.to(h.dtype)).float().masked_fill(~self.held,
                                                                                                 float("-inf"))


def personal_head(heads: FedLoGeHeads, held: Tensor, realign: bool) -> RealignedHead:
    """``localtest``: l_k(h) + g_aux(h) (LA: g_aux's rows scaled by l_k's norms), classes not held masked."""
    local, aux = heads.local.weight.detach(), heads.aux.weight.detach()
    aux_weight = local_realignment(aux, local) if realign else aux
    return RealignedHead(local + aux_weight, heads.local.bias.detach() + heads.aux.bias.detach(), held)


def _heads(model: EncoderClassifier) -> FedLoGeHeads:
    if not isinstance(model.classifier, FedLoGeHeads):
        raise ValueError("method: 'fedloge' needs its heads (methods.fixed_classifier.fedloge.add_fedloge_heads)")
    return model.classifier


# ---------------------------------------------------------------- client and server


class FedLoGeClient(ClientMethod):
    """CE through the SSE-C for the backbone, plus CE of g_aux and of the local head on detached features."""

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        heads = _heads(model)
        heads.install_sse(sse_weight(self.cfg, model.feature_dim, self.num_classes))
        with torch.no_grad():
            if LOCAL_WEIGHT in self.state:
                weight, bias = torch.from_numpy(self.state[LOCAL_WEIGHT]), torch.from_numpy(self.state[LOCAL_BIAS])
            else:  # the first time: nn.Linear's initialisation, U(±1/√d), from the method's stream
                bound = model.feature_dim ** -0.5
                weight = (torch.rand(heads.local.weight.shape, generator=generator) * 2 - 1) * bound
                bias = (torch.rand(heads.local.bias.shape, generator=generator) * 2 - 1) * bound
            heads.local.weight.copy_(weight)
            heads.local.bias.copy_(bias)
        self.held = torch.bincount(labels.cpu(), minlength=self.num_classes) > 0
        self.received = copy.deepcopy(model)  # the global model and this client's head before training

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        heads = _heads(model)
        h = model.encoder(x)
        free = h.detach()
        return (F.cross_entropy(heads(h).float(), y) + F.cross_entropy(heads.aux(free).float(), y)
                + F.cross_entropy(heads.local(free).float(), y))

    def state_to_keep(self, model: EncoderClassifier) -> ClientState:
        local = _heads(model).local
        return {LOCAL_WEIGHT: local.weight.detach().cpu().numpy().copy(),
                LOCAL_BIAS: local.bias.detach().cpu().numpy().copy()}

    def personalised_model(self, model: EncoderClassifier) -> EncoderClassifier:
        """The received global backbone with l_k + g_aux (LA-realigned where the server asks), absent classes masked."""
        received = self.received
        head = personal_head(_heads(received), self.held.to(next(received.parameters()).device),
                             REALIGN in self.payload)
        return EncoderClassifier(received.encoder, received.feature_dim, received.num_classes, head).eval()


class FedLoGeServer(ServerMethod):
    """Weighted averaging of backbone and g_aux; evaluates the SSE-C model, or g_aux realigned (GHA)."""

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        _heads(model).install_sse(sse_weight(cfg, model.feature_dim, model.num_classes))
        self.server_round = 0
        self.aux_norms = np.ones(model.num_classes)

    @classmethod
    def round_plan(cls, cfg: RunConfig, server_round: int) -> dict[str, Any]:
        return {REALIGNMENT_PLAN: cfg.fedloge_realign == "every-round" or (
            cfg.fedloge_realign == "last-round" and server_round == cfg.num_server_rounds)}

    def realigns(self, server_round: int) -> bool:
        return self.round_plan(self.cfg, server_round)[REALIGNMENT_PLAN]

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        self.server_round = server_round
        return {REALIGN: np.ones(1, dtype=np.int8)} if self.realigns(server_round) else {}

    def evaluation_model(self, global_model: EncoderClassifier) -> EncoderClassifier:
        aux = _heads(global_model).aux
        self.aux_norms = _row_norms(aux.weight.detach()).flatten().cpu().double().numpy()
        if not self.realigns(self.server_round):
            return global_model  # the SSE-C on the global backbone (the official per-round global test)
        head = RealignedHead(global_realignment(aux.weight.detach(), self.cfg.fedloge_gha_norm), aux.bias.detach())
        return EncoderClassifier(global_model.encoder, global_model.feature_dim, global_model.num_classes, head)

    def round_metrics(self) -> dict[str, float | int]:
        """The spread of g_aux's class norms (what GHA evens out): largest over smallest."""
        return {"fedloge_aux_norm_ratio": float(self.aux_norms.max() / max(self.aux_norms.min(), NORM_EPS))}
