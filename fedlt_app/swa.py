"""Server-side weight averaging of the evaluated network (``swa-start``).

Stochastic weight averaging (Izmailov et al., UAI 2018) averages the weights a run passes through late in
training: the mean lies in a flatter part of the loss surface than any one of them and often generalises
better. A federated server can do it for free (Caldarola et al., ECCV 2022, pair it with FedSAM as "FedSWA"):
it keeps the running mean of the networks it evaluates from round ``swa-start`` on and evaluates (and saves as
the final model) that mean, while training continues from the latest global model, untouched, so clients see
nothing of it. Why fedlt has it: on the converged protocol the logit-adjusted runs peak near round 30 and then
lose accuracy as they memorise the long-tailed set; an average over the late rounds is the cheapest way to keep
what the peak had.

What is averaged is the network the server *evaluates* (``ServerMethod.evaluation_model``: a re-trained or
calibrated head included), every floating-point tensor of its ``state_dict``: weights, and batch-norm running
statistics alike (the server has no data to recompute those, as SWA's ``update_bn`` would; averaging them is
what FedAvg already does with them across clients). Integer buffers (batch-norm's step counter) keep the latest
value.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from fedlt_app.models import EncoderClassifier


class WeightAverage:
    """The running mean of the evaluated networks of rounds ``start_round`` on (0 = off)."""

    def __init__(self, start_round: int) -> None:
        self.start_round = start_round
        self.count = 0
        self._mean: dict[str, torch.Tensor] | None = None

    def active(self, server_round: int) -> bool:
        return 0 < self.start_round <= server_round

    def update(self, network: EncoderClassifier) -> EncoderClassifier:
        """Fold ``network`` into the mean; returns a copy of it that holds the mean (``network`` is untouched)."""
        state = {key: value.detach() for key, value in network.state_dict().items()}
        self.count += 1
        if self._mean is None:
            self._mean = {key: value.clone() for key, value in state.items()}
        else:
            for key, value in state.items():
                if value.is_floating_point():  # m_n = m_{n-1} + (x_n - m_{n-1}) / n
                    self._mean[key] += (value - self._mean[key]) / self.count
                else:
                    self._mean[key] = value.clone()
        averaged = copy.deepcopy(network)
        averaged.load_state_dict(self._mean)
        return averaged

    def round_metrics(self) -> dict[str, int]:
        return {"swa_models": self.count} if self.start_round else {}

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint: a resumed run continues the same mean."""
        mean = None if self._mean is None else {key: value.cpu().numpy() for key, value in self._mean.items()}
        return {"count": self.count, "mean": mean}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.count = int(state["count"])
        mean = state["mean"]
        self._mean = None if mean is None else {key: torch.from_numpy(np.asarray(value)).to(device)
                                                for key, value in mean.items()}
