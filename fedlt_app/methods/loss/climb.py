"""CLIMB (Shen et al., ICLR 2022): class-imbalance FL as constrained optimisation.

Every client k carries a dual variable λ_k ≥ 0 on the constraint "my loss is
not more than ε above the average".  Clients report ℓ_k, the loss of the
*received* global model on their data; the server

* averages models with weights (n_k/Σn)·(1 + λ_k − mean λ) (mean over all
  clients, the duals from before this round's update; negative weights are
  clipped to 0 and Flower renormalises the rest), then
* takes a dual ascent step λ_k ← clip(λ_k + η_D·(ℓ_k − ℓ̄ − ε), 0, 5), where ℓ̄
  is the sample-weighted mean loss of the round's clients.

The authors' port summed ℓ̄ once per parameter tensor, so its duals never
moved; this is the intended rule.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData, augment
from fedlt_app.methods.base import ClientMethod, ClientReport, Payload, ServerMethod
from fedlt_app.models import EncoderClassifier

DUAL_CAP = 5.0


def climb_weights(num_examples: np.ndarray, duals: np.ndarray, all_duals_mean: float) -> np.ndarray:
    return np.clip(num_examples / num_examples.sum() * (1 + duals - all_duals_mean), 0.0, None)


def dual_step(duals: np.ndarray, losses: np.ndarray, num_examples: np.ndarray, lr: float, eps: float) -> np.ndarray:
    mean_loss = float(np.sum(num_examples / num_examples.sum() * losses))
    return np.clip(duals + lr * (losses - mean_loss - eps), 0.0, DUAL_CAP)


class ClimbClient(ClientMethod):
    @torch.no_grad()
    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        """ℓ_k: mean cross-entropy of the received model on the local data."""
        device = next(model.parameters()).device
        model.eval()
        total = 0.0
        for start in range(0, len(labels), 256):
            x = augment(images[start : start + 256].to(device), self.cfg.dataset, generator, self.cfg.augment)
            total += float(F.cross_entropy(model(x), labels[start : start + 256].to(device), reduction="sum"))
        self._loss = total / max(len(labels), 1)

    def report(self) -> Payload:
        return {"climb-loss": np.array([self._loss], dtype=np.float64)}


class ClimbServer(ServerMethod):
    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        self.duals = np.zeros(data.num_clients, dtype=np.float64)

    def aggregation_weights(self, server_round: int, reports: list[ClientReport]) -> list[float] | None:
        """CLIMB's weights; plain sample counts if every one of them clips to 0.

        Under partial participation the mean dual over all clients can exceed
        1 + λ_k for every sampled k; averaging with all-zero weights is undefined.
        """
        ids = [r.partition_id for r in reports]
        counts = np.array([r.num_examples for r in reports], dtype=np.float64)
        weights = climb_weights(counts, self.duals[ids], float(self.duals.mean()))
        return weights.tolist() if weights.sum() > 0 else None

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        ids = [r.partition_id for r in reports]
        counts = np.array([r.num_examples for r in reports], dtype=np.float64)
        losses = np.array([float(r.payload["climb-loss"][0]) for r in reports])
        self.duals[ids] = dual_step(self.duals[ids], losses, counts, self.cfg.climb_dual_lr, self.cfg.climb_epsilon)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"duals": self.duals}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.duals = state["duals"]

    def round_metrics(self) -> dict[str, float | int]:
        return {"climb_dual_mean": float(self.duals.mean()), "climb_dual_max": float(self.duals.max())}
