"""Fed-GraB (Xiao et al., NeurIPS 2023): Self-adjusting Gradient Balancer and Direct Prior Analyzer.

**SGB.** Each client trains on the sigmoid loss Σ_c BCE(z_c, t_c) / n (t the
one-hot label) and re-weights, per class c, the gradient that reaches the
logits: w⁺_c on its positive entries (samples of class c), w⁻_c on its
negatives. A PID controller per class sets the weights from the accumulated
(weighted) gradient magnitudes G⁺_c = Σ |g_ic| t_ic and G⁻_c = Σ |g_ic| (1 − t_ic),
summed over every step the client has ever taken:

    e_c = 0 − (G⁺_c − G⁻_c)                                   (set point: balance)
    u_c += K_p (e_c − e'_c) + K_i e_c + K_d (e_c − 2e'_c + e''_c)   (incremental PID; e', e'': last two errors)
    w⁺_c = φ(u_c),  w⁻_c = φ(−u_c),  φ(x) = (10/9) / (1/9 + e^{−x/2})   (φ(0) = 1, φ ∈ (0, 10))

one controller step per class per local step, before the step's backward. A
class whose negatives outweigh its positives (a tail class: every other
class's samples push it down) gets a growing u_c: its positive gradients up
to ×10, its negative ones towards 0. A balanced class can be exempted for a
step: going through the balanced classes in index order, the k-th one met
while exempting (k = 0, 1, …) is exempted with probability 0.1^{k/(T−1)} (T
balanced classes; the first is always exempt): weight 1 on its column for
that step and no contribution to G⁺, G⁻. The controllers and G⁺, G⁻ live on
the client (``ClientMethod.state``) from one round it trains in to the next.

**DPA.** The server estimates the global class prior from the global model's
classifier: π̂_c = ‖W_c‖₂ / Σ_j ‖W_j‖₂ (the weight norm of a class grows with
its share of the training data), splits the classes as the code's
``shot_split`` does (sorted by π̂, head up to 75 % of the cumulative prior,
middle up to 95 %, tail the rest) and, with ``fedgrab-balance-classes=dpa-tail``,
broadcasts the tail: only those classes' controllers run (the code's
``pidmask=["head", "middle"]`` closes head and middle), the others keep
weight 1 and a reset controller. Round 1 (an untrained classifier) balances
every class.

Source: the authors' code, github.com/ZackZikaiXiao/FedGraB (``fed_grab.py``;
``util/losses.py``: ``PIDLOSS``, ``PID``; ``util/update_baseline.py``:
``update_weights_pid``; ``util/util.py``: ``shot_split``). Defaults: K_p = 10,
K_i = 0.01, K_d = 0.1 (``PID``, mode ``PID_DELTA``). **The released code has
no DPA**: it declares every class a tail class
(``get_3shotclass(head_class=[], middle_class=[], tail_class=[0..9])``), so
every class is balanced in every round. The default here,
``fedgrab-balance-classes=all``, is that; ``dpa-tail`` is the paper's DPA as
described above, rebuilt from the paper and the code's own pieces (its weight
norm study ``mytools/weightNorm.py`` and ``shot_split``), not from released code.
The server logs the DPA's split every round either way.

Disagreements and flaws, and what this module does:

* Classifier not trained (official flaw, not copied). ``update_weights_pid``
  builds its SGD on the backbone's parameters only; the classifier
  (``GBA_Layer``) gets gradients but is never stepped, so the global
  classifier stays at its random initialisation. FedLTLib
  (gzhu-hcai/LongTailLib ``clientgrab.py``) trains it; so does fedlt (the
  shared loop trains the whole model).
* Aggregation weights (official flaw, not copied). The official loop trains
  every client in index order but weights them with the sample counts of
  ``idxs_users``, a random permutation of the clients, so each model gets
  another client's weight. FedLTLib and fedlt weight by the client's own count.
* Output limit (flaw in both, copied). ``PID.LimitMax`` clamps a local
  variable and returns nothing: u_c is never limited to ±100. fedlt keeps the
  unclamped output the code runs with (φ saturates long before: φ(±50) is
  within 1e-10 of 10 and 0).
* One balanced class (flaw, fixed as FedLTLib). 0.1^{k/(T−1)} divides by zero
  for T = 1 (a ZeroDivisionError in the official code; FedLTLib adds 1e-10);
  fedlt exempts that class with probability 1, FedLTLib's value.
* Gradient re-weighting. The official hook multiplies the logits' gradient
  in place (PyTorch propagates it); fedlt's hook returns the product, the
  same gradient. G⁺, G⁻ are computed from the closed form g_ic = w_ic (σ(z_ic) − t_ic) / n,
  equal to the hook's gradient without fp16 loss scaling. Controller state in float64
  (the code: float32 tensors).
* Random exemption draws come from the method's own stream (the code: Python's
  ``random``).
* Not copied because fedlt's loop is shared by every method, or its keys are:
  the official recipe's lr 0.03, momentum 0.5, batch 10 (README: 5), 5 local
  epochs, every client every round, no clipping.

Secure aggregation (``secure-aggregation=secagg``): the server needs the weighted model sum and, for its
round metrics, the sum of the clients' last-step (w⁺, w⁻) and how many clients sent one (``sum_segments``;
the plain path sums the same terms); the DPA reads only the global model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.methods.base import ClientMethod, ClientReport, ClientState, Payload, ServerMethod, SumSpec
from fedlt_app.methods.class_sums import summed
from fedlt_app.models import EncoderClassifier

BALANCED = "fedgrab-balanced"  # broadcast: 1 for a class whose controller runs (dpa-tail from round 2)
WEIGHTS = "fedgrab-weights"  # report: a client's mean (w⁺, w⁻) over its balanced classes at its last step
REPORTERS = "fedgrab-reporters"  # 1 per client that sent WEIGHTS: the sum's divisor (a sum under secagg)
STATE_KEYS = ("fedgrab-pos-grad", "fedgrab-neg-grad", "fedgrab-pid-out", "fedgrab-pid-errors")
SHOT_THRESHOLDS = (75.0, 95.0)  # shot_split's cumulative percentages: head / middle / tail
EXEMPT_BASE = 0.1  # the k-th exempted class: probability EXEMPT_BASE ** (k / (T - 1))


def balance_weight(x: Tensor) -> Tensor:
    """φ(x) = (10/9) / (1/9 + e^{−x/2}): 1 at 0, towards 10 for x → +∞ and 0 for x → −∞."""
    return (10 / 9) / (1 / 9 + torch.exp(-0.5 * x))


def pid_step(out: Tensor, errors: Tensor, measured: Tensor, gains: tuple[float, float, float],
             active: Tensor) -> tuple[Tensor, Tensor]:
    """One incremental (PID_DELTA) step of every active controller towards set point 0.

    ``errors[:, 0]`` is the newest error. Inactive controllers keep their state; their output counts as 0.
    """
    kp, ki, kd = gains
    e0 = -measured
    e1, e2 = errors[:, 0], errors[:, 1]
    new_out = out + kp * (e0 - e1) + ki * e0 + kd * (e0 - 2.0 * e1 + e2)
    new_errors = torch.stack([e0, e1, e2], dim=1)
    mask = active.unsqueeze(1)
    return torch.where(active, new_out, out), torch.where(mask, new_errors, errors)


def exemption_probabilities(count: int) -> list[float]:
    """0.1^{k/(T−1)} for the k-th exemption among T balanced classes (1 for T = 1)."""
    if count <= 1:
        return [1.0] * count
    return [EXEMPT_BASE ** (k / (count - 1)) for k in range(count)]


def draw_exemptions(balanced: Tensor, generator: torch.Generator) -> Tensor:
    """Which balanced classes are exempt this step: in class order, the k-th exemption with 0.1^{k/(T−1)}."""
    classes = balanced.nonzero().flatten().tolist()
    probabilities = exemption_probabilities(len(classes))
    exempt = torch.zeros_like(balanced)
    k = 0
    for c in classes:
        p = probabilities[k]
        if p >= 1.0 or float(torch.rand(1, generator=generator)) < p:  # random_unit: no draw for p = 1
            exempt[c] = True
            k += 1
    return exempt


def dpa_prior(classifier_weight: Tensor) -> np.ndarray:
    """π̂_c = ‖W_c‖₂ / Σ_j ‖W_j‖₂, float64."""
    norms = classifier_weight.detach().double().norm(dim=1).cpu().numpy()
    return norms / norms.sum()


def shot_split(prior: np.ndarray, thresholds: tuple[float, float] = SHOT_THRESHOLDS) -> dict[str, list[int]]:
    """The code's ``shot_split``: classes by prior (descending, stable); head up to the first threshold of the
    cumulative percentage, middle up to the second, tail the rest."""
    order = sorted(range(len(prior)), key=lambda c: -prior[c])
    cumulative = np.cumsum(prior[order]) / prior.sum() * 100
    lower = np.concatenate([[0.0], cumulative[:-1]])
    cut1 = cut2 = 0
    for i, (low, high) in enumerate(zip(lower, cumulative, strict=True)):
        if low < thresholds[0] <= high:
            cut1 = i
        if low < thresholds[1] <= high:
            cut2 = i
    return {"head": order[: cut1 + 1], "middle": order[cut1 + 1 : cut2 + 1], "tail": order[cut2 + 1 :]}


class FedGraBClient(ClientMethod):
    """Sigmoid loss with the SGB's per-class positive/negative gradient weights; controllers kept on the node."""

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        c = self.num_classes
        self.generator = generator
        self.gains = (self.cfg.fedgrab_kp, self.cfg.fedgrab_ki, self.cfg.fedgrab_kd)
        balanced = self.payload.get(BALANCED)
        self.balanced = torch.ones(c, dtype=torch.bool) if balanced is None else torch.from_numpy(balanced > 0)
        state = {k: torch.from_numpy(np.array(self.state[k], dtype=np.float64))  # a copy: never write the store
                 for k in STATE_KEYS if k in self.state}
        self.pos_grad = state.get(STATE_KEYS[0], torch.zeros(c, dtype=torch.float64))
        self.neg_grad = state.get(STATE_KEYS[1], torch.zeros(c, dtype=torch.float64))
        out = state.get(STATE_KEYS[2], torch.zeros(c, dtype=torch.float64))
        errors = state.get(STATE_KEYS[3], torch.zeros(c, 3, dtype=torch.float64))
        # a controller that does not run is reset (the code's apply_3shot_mask on closed ones)
        self.pid_out = torch.where(self.balanced, out, torch.zeros_like(out))
        self.pid_errors = torch.where(self.balanced.unsqueeze(1), errors, torch.zeros_like(errors))
        self.last_weights = (torch.ones(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64))

    def class_weights(self) -> tuple[Tensor, Tensor]:
        """One controller step per class; (w⁺, w⁻), weight 1 for classes whose controller does not run."""
        self.pid_out, self.pid_errors = pid_step(self.pid_out, self.pid_errors, self.pos_grad - self.neg_grad,
                                                 self.gains, self.balanced)
        effective = torch.where(self.balanced, self.pid_out, torch.zeros_like(self.pid_out))
        return balance_weight(effective), balance_weight(-effective)

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)
        n = len(y)
        target = F.one_hot(y, self.num_classes).to(logits.dtype)
        pos_w, neg_w = self.class_weights()
        self.last_weights = (pos_w, neg_w)
        exempt = draw_exemptions(self.balanced, self.generator)
        weight = pos_w * target.double().cpu() + neg_w * (1 - target.double().cpu())
        weight[:, exempt] = 1.0
        self.accumulate(logits.detach(), target, weight, exempt)
        weight = weight.to(logits.device, logits.dtype)
        if logits.requires_grad:
            logits.register_hook(lambda grad: grad * weight)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / n

    def accumulate(self, logits: Tensor, target: Tensor, weight: Tensor, exempt: Tensor) -> None:
        """G⁺ += Σ_i |g_ic| t_ic, G⁻ += Σ_i |g_ic| (1 − t_ic), g = w (σ(z) − t) / n; exempt classes add nothing."""
        t = target.double().cpu()
        grad = (weight * (torch.sigmoid(logits.double().cpu()) - t) / len(t)).abs()
        grad[:, exempt] = 0.0
        self.pos_grad += (grad * t).sum(0)
        self.neg_grad += (grad * (1 - t)).sum(0)

    def report(self) -> Payload:
        """Mean w⁺ and w⁻ over the balanced classes at the last step (for the round's metrics)."""
        pos_w, neg_w = self.last_weights
        active = self.balanced if bool(self.balanced.any()) else torch.ones_like(self.balanced)
        return {WEIGHTS: np.array([float(pos_w[active].mean()), float(neg_w[active].mean())], dtype=np.float64)}

    def summands(self) -> Payload:
        """Secure aggregation: the server's mean of the weights needs only their sum and the reporters' number."""
        return weight_summands(self.report())

    def state_to_keep(self, model: EncoderClassifier) -> ClientState:
        """The controllers and the accumulated gradients: the code keeps one PIDLOSS per client for the run."""
        values = (self.pos_grad, self.neg_grad, self.pid_out, self.pid_errors)
        return {key: value.numpy().copy() for key, value in zip(STATE_KEYS, values, strict=True)}


def weight_summands(report: Payload) -> Payload:
    """A client's terms of the server's two sums: its (w⁺, w⁻) and a 1."""
    return {WEIGHTS: np.asarray(report[WEIGHTS], dtype=np.float64), REPORTERS: np.ones(1, dtype=np.int64)}


class FedGraBServer(ServerMethod):
    """FedAvg; the DPA's prior estimate and, with ``dpa-tail``, the broadcast of the classes to balance."""

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        if not isinstance(model.classifier, nn.Linear):
            raise ValueError("method: 'fedgrab' estimates the prior from a linear classifier; this head is not one")
        self.dpa_tail: list[int] = []
        self.balanced_classes = self.num_classes
        self.weights = (1.0, 1.0)

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> Payload:
        assert isinstance(global_model.classifier, nn.Linear)
        self.dpa_tail = shot_split(dpa_prior(global_model.classifier.weight))["tail"]
        if self.cfg.fedgrab_balance_classes != "dpa-tail" or server_round == 1:
            self.balanced_classes = self.num_classes
            return {}
        balanced = np.zeros(self.num_classes, dtype=np.float32)
        balanced[self.dpa_tail] = 1.0
        self.balanced_classes = len(self.dpa_tail)
        return {BALANCED: balanced}

    def sum_segments(self) -> dict[str, SumSpec]:
        """The clients' summed (w⁺, w⁻) and their number (exact)."""
        return {WEIGHTS: SumSpec((2,)), REPORTERS: SumSpec((1,), exact=True)}

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        """The weights' mean on plain reports: the very sums secure aggregation would reveal."""
        self.absorb_sums(server_round, summed(self.sum_segments(),
                                              (weight_summands(r.payload) for r in reports if WEIGHTS in r.payload)))

    def absorb_sums(self, server_round: int, sums: Payload) -> None:
        """The clients' mean (w⁺, w⁻) at their last step; (1, 1) when none reported."""
        reporters = int(sums[REPORTERS][0])
        mean = np.asarray(sums[WEIGHTS], dtype=np.float64) / max(reporters, 1)
        self.weights = (float(mean[0]), float(mean[1])) if reporters else (1.0, 1.0)

    def round_metrics(self) -> dict[str, float | int]:
        """Classes balanced this round, the DPA's tail size, and the clients' mean w⁺ and w⁻ at their last step."""
        return {"fedgrab_balanced_classes": self.balanced_classes,
                "fedgrab_dpa_tail_classes": len(self.dpa_tail),
                "fedgrab_pos_weight": self.weights[0], "fedgrab_neg_weight": self.weights[1]}

    def state_dict(self) -> dict[str, Any]:
        """Nothing to keep: the DPA reads the global model each round and the controllers live on the clients."""
        return {}
