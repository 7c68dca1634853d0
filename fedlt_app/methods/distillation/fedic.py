"""FedIC (Shang, Lu, Cheung & Wang, ICME 2022): calibrated ensemble distillation on the server.

Clients train with cross-entropy (FedAvg). Each round the server, holding a small *labeled* balanced set
and an *unlabeled* set, runs three stages of ``fedic-steps`` Adam steps each (lr ``fedic-lr``):

1. Refined FedAvg: the sample-weighted FedAvg of the clients' models, fine-tuned by cross-entropy on
   labeled batches (weight decay 2e-4).
2. Calibrated ensemble ("highway"): per sample, client k's logits z_k get the weight
   w_k = σ(z_k·a + b) / Σ_j σ(z_j·a + b) (a ∈ R^C, b ∈ R); the ensemble Σ_k w_k z_k is calibrated per class,
   ẑ = s ⊙ Σ_k w_k z_k + β, and mixed with the refined model's logits z_r by a gate g = σ(v·h̄ + c) of the
   clients' mean feature h̄: teacher = g·ẑ + (1 − g)·z_r. Only (a, b, s, β, v, c) train, by cross-entropy on
   labeled batches; the client models and the refined model are frozen (eval mode).
3. Distillation: the global model starts again from the plain FedAvg and is trained (train mode, weight
   decay 2e-4) on ld · KL(softmax(teacher/T) ‖ softmax(student/T)) over an unlabeled batch (batchmean, no
   T² factor) + (1 − ld) · CE on a labeled batch. The result is the new global model
   (``global_model_overrides``: every entry), broadcast, evaluated and checkpointed.

The gate, the calibration parameters and the three Adam optimizers persist across rounds (the refined and
distilled models are reloaded from FedAvg each round, their optimizers' moments carry over), as in the
official code. Batches are drawn without replacement per step (labeled ``fedic-labeled-batch-size``,
unlabeled ``fedic-unlabeled-batch-size``) and augmented as training batches.

Server data (``fedic-server-data``). The official code holds out 100 images per class from CIFAR-10's
training split before the long-tail cut (the labeled teaching set, never on a client) and uses CIFAR-100's
training split as the unlabeled set. fedlt offers ``heldout``: training-split images of the data set that
are on no client (outside the federation's long-tailed training set): per class the first
``fedic-teach-per-class`` of them are the labeled set, all the others (labels dropped) the unlabeled set.
With ``samples-per-class`` = 0 every image of the head class is on a client, so ``heldout`` fails there
naming the keys; leave room with ``samples-per-class``. The unlabeled held-out images are skewed towards the
tail classes (the long-tail cut left them out); the official unlabeled set is another data set. No default:
a run with ``method=fedic`` must name its server data.

Source: the authors' code, github.com/shangxinyi/FEDIC (``main.py``: ``Ensemble_highway``,
``Global.update_distillation_highway_feature``; ``options.py``). Defaults: ``lr_global_teaching`` 0.001,
``temperature`` 2, ``ld`` 0.5, ``mini_batch_size`` 20, ``mini_batch_size_unlabeled`` 128, 100 steps per
stage (hard-coded), 100 teaching images per class (``num_data_train`` 49000 of 50000).

Disagreements with FedLTLib (gzhu-hcai/LongTailLib ``serverfedic.py``) and flaws, and what this does:

* Unlabeled set. FedLTLib uses the *whole* balanced CIFAR-10 training set, which contains every client's
  training images (and the teaching set); the official code uses CIFAR-100. fedlt: only images on no client.
* Mean feature of the gate. The official code averages with the hard-coded weight 1/8 for its 8 online
  clients (``zip`` with ``[1/8] * 8``: a cohort of K < 8 gets Σ h_k / 8, K > 8 drops clients after the
  8th); FedLTLib and fedlt use 1/K. The official ``ensemble_scale`` (10×1) and the gate's input width (256)
  are hard-coded too; fedlt sizes them by the data set and model.
* The refined model's logits in stage 2 are computed with gradient in the official code (wasted, no step
  takes them); fedlt computes them without. Same values.
* Not copied: the official global RNG (``np.random.RandomState(seed)`` for batch indices); fedlt draws from a
  server stream seeded by ``seed``.

Communication per round: as FedAvg (the model down and up); the server reads each client's model.
Secure aggregation: refused (the server needs every client's model, not their sum).
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
from fedlt_app.methods.base import ClientReport, Payload, ServerMethod
from fedlt_app.models import EncoderClassifier

WEIGHT_DECAY = 2e-4  # official Adam weight decay of the refined FedAvg and the distilled model (none on the highway)


def server_split(data: FederatedData, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """``heldout``: (labeled, unlabeled) indices into the training split, both outside every client's data.

    Labeled: per class the first ``per_class`` training images that no client holds; unlabeled: the rest of
    those images. Raises ValueError naming the keys when a class has too few.
    """
    labels = data.dataset.train_labels.numpy()
    outside = np.setdiff1d(np.arange(len(labels)), np.asarray(data.train_indices))
    per_label = [outside[labels[outside] == c] for c in range(data.num_classes)]
    short = {c: len(idx) for c, idx in enumerate(per_label) if len(idx) < per_class}
    if short:
        raise ValueError(
            f"fedic-server-data: 'heldout' needs fedic-teach-per-class={per_class} training images per class "
            f"that no client holds; class: available {short} (with samples-per-class=0 every image of the head "
            "class is on a client: set samples-per-class to leave some out, or lower fedic-teach-per-class)")
    labeled = np.sort(np.concatenate([idx[:per_class] for idx in per_label])).astype(np.int64)
    return labeled, np.setdiff1d(outside, labeled).astype(np.int64)


class CalibratedEnsemble(nn.Module):
    """The official ``Ensemble_highway``: weighted, calibrated client logits gated against the refined model's."""

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        super().__init__()
        self.ensemble_scale = nn.Parameter(torch.ones(num_classes, 1))
        self.ensemble_bias = nn.Parameter(torch.zeros(1))
        self.logit_scale = nn.Parameter(torch.ones(num_classes))
        self.logit_bias = nn.Parameter(torch.zeros(num_classes))
        self.gate = nn.Linear(feature_dim, 1)

    def forward(self, features: list[Tensor], logits: list[Tensor], refined_logits: Tensor) -> Tensor:
        scores = torch.sigmoid(torch.cat([z @ self.ensemble_scale + self.ensemble_bias for z in logits], dim=1))
        weights = scores / scores.sum(dim=1, keepdim=True)  # L1 norm over clients (scores are positive)
        ensemble = sum(weights[:, k : k + 1] * z for k, z in enumerate(logits))
        calibrated = ensemble * self.logit_scale + self.logit_bias
        gate = torch.sigmoid(self.gate(torch.stack(features).mean(dim=0)))
        return gate * calibrated + (1 - gate) * refined_logits


def weighted_average(states: list[dict[str, Tensor]], weights: list[int]) -> dict[str, Tensor]:
    """The official ``_initialize_for_model_fusion``: Σ_k n_k θ_k / Σ_k n_k, entry by entry (in float64)."""
    total = float(sum(weights))
    return {key: sum(s[key].double() * (n / total) for s, n in zip(states, weights, strict=True))
            .to(states[0][key].dtype) for key in states[0]}


class FedICServer(ServerMethod):
    reads_client_models = True

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        if cfg.fedic_server_data != "heldout":  # the config refuses fedic without server data
            raise ValueError(f"fedic-server-data: unsupported value {cfg.fedic_server_data!r}; allowed: heldout")
        labeled, unlabeled = server_split(data, cfg.fedic_teach_per_class)
        if len(labeled) < cfg.fedic_labeled_batch_size or len(unlabeled) < cfg.fedic_unlabeled_batch_size:
            raise ValueError(
                f"fedic-labeled-batch-size / fedic-unlabeled-batch-size: the server holds {len(labeled)} labeled and "
                f"{len(unlabeled)} unlabeled images, fewer than one batch (batches are drawn without replacement)")
        images, labels = data.dataset.train_images, data.dataset.train_labels
        self.dataset = cfg.dataset
        self.labeled = (images[labeled], labels[labeled])
        self.unlabeled = images[unlabeled]
        self.device = next(model.parameters()).device
        self.generator = torch.Generator().manual_seed(cfg.seed + 130363)
        self.template = copy.deepcopy(model)  # architecture of the client models read each round
        self.refined = copy.deepcopy(model)  # the official model2
        self.student = copy.deepcopy(model)  # the official model: the distilled global model
        self.ensemble = CalibratedEnsemble(self.num_classes, model.feature_dim).to(self.device)
        self.refined_optimizer = torch.optim.Adam(self.refined.parameters(), lr=cfg.fedic_lr, weight_decay=WEIGHT_DECAY)
        self.ensemble_optimizer = torch.optim.Adam(self.ensemble.parameters(), lr=cfg.fedic_lr)
        self.student_optimizer = torch.optim.Adam(self.student.parameters(), lr=cfg.fedic_lr, weight_decay=WEIGHT_DECAY)
        self.distilled: Payload = {}
        self.losses = {"fedic_refine_loss": float("nan"), "fedic_ensemble_loss": float("nan"),
                       "fedic_distill_loss": float("nan")}

    # ------------------------------------------------------------------ batches

    def _draw(self, count: int, size: int) -> Tensor:
        return torch.randperm(count, generator=self.generator)[:size]

    def labeled_batch(self) -> tuple[Tensor, Tensor]:
        images, labels = self.labeled
        pick = self._draw(len(labels), self.cfg.fedic_labeled_batch_size)
        batch = augment(images[pick].to(self.device), self.dataset, self.generator, self.cfg.augment)
        return batch, labels[pick].to(self.device)

    def unlabeled_batch(self) -> Tensor:
        pick = self._draw(len(self.unlabeled), self.cfg.fedic_unlabeled_batch_size)
        return augment(self.unlabeled[pick].to(self.device), self.dataset, self.generator, self.cfg.augment)

    # ------------------------------------------------------------------ the three stages

    def _step(self, optimizer: torch.optim.Optimizer, loss: Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def _ensemble_inputs(self, clients: list[EncoderClassifier],
                         x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        features, logits = [], []
        with self.precision.autocast():
            for client in clients:
                h = client.encoder(x)
                features.append(h.float())
                logits.append(client.classifier(h).float())
            refined = self.refined(x).float()
        return features, logits, refined

    def refine(self, fedavg: dict[str, Tensor]) -> None:
        self.refined.load_travelling_state(fedavg)
        self.refined.train()
        for _ in range(self.cfg.fedic_steps):
            x, y = self.labeled_batch()
            with self.precision.autocast():
                logits = self.refined(x).float()
            self.losses["fedic_refine_loss"] = self._step(self.refined_optimizer, F.cross_entropy(logits, y))
        self.refined.eval()

    def fit_ensemble(self, clients: list[EncoderClassifier]) -> None:
        self.ensemble.train()
        for _ in range(self.cfg.fedic_steps):
            x, y = self.labeled_batch()
            teacher = self.ensemble(*self._ensemble_inputs(clients, x))
            self.losses["fedic_ensemble_loss"] = self._step(self.ensemble_optimizer, F.cross_entropy(teacher, y))
        self.ensemble.eval()

    def distil(self, clients: list[EncoderClassifier], fedavg: dict[str, Tensor]) -> None:
        self.student.load_travelling_state(fedavg)
        self.student.train()
        t, ld = self.cfg.fedic_temperature, self.cfg.fedic_ld
        for _ in range(self.cfg.fedic_steps):
            unlabeled = self.unlabeled_batch()
            x, y = self.labeled_batch()
            with torch.no_grad():
                teacher = self.ensemble(*self._ensemble_inputs(clients, unlabeled))
            with self.precision.autocast():
                student = self.student(unlabeled).float()
                student_labeled = self.student(x).float()
            soft = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean")
            loss = ld * soft + (1 - ld) * F.cross_entropy(student_labeled, y)
            self.losses["fedic_distill_loss"] = self._step(self.student_optimizer, loss)
        self.student.eval()

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        states = [{k: torch.from_numpy(np.array(v)).to(self.device) for k, v in r.model.items()} for r in reports]
        if not states:
            self.distilled = {}
            return
        clients = []
        for state in states:
            client = copy.deepcopy(self.template)
            client.load_travelling_state(state)
            clients.append(client.eval().requires_grad_(False))
        fedavg = weighted_average(states, [r.num_examples for r in reports])
        self.refine(fedavg)
        self.fit_ensemble(clients)
        self.distil(clients, fedavg)
        self.distilled = {k: v.detach().cpu().numpy().copy() for k, v in self.student.travelling_state().items()}

    def global_model_overrides(self, server_round: int) -> Payload:
        """The distilled model replaces the aggregate entirely."""
        return self.distilled

    def round_metrics(self) -> dict[str, float | int]:
        return dict(self.losses)

    def state_dict(self) -> dict[str, Any]:
        return {"ensemble": self.ensemble.state_dict(), "generator": self.generator.get_state(),
                "optimizers": [o.state_dict() for o in (self.refined_optimizer, self.ensemble_optimizer,
                                                        self.student_optimizer)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ensemble.load_state_dict(state["ensemble"])
        self.generator.set_state(state["generator"])
        for optimizer, saved in zip((self.refined_optimizer, self.ensemble_optimizer, self.student_optimizer),
                                    state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
