"""Fed-Focal Loss: focal loss (Lin et al., 2017) as the local objective.

    FL(p_y) = −(1 − p_y)^γ · log p_y

Well-classified (mostly head-class) samples are down-weighted by (1 − p_y)^γ,
so the gradient budget shifts to hard, often tail-class, samples. γ = 2 as in
the paper's baseline; no α weighting.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from fedlt_app.methods.base import ClientMethod
from fedlt_app.models import EncoderClassifier


def focal_loss(logits: Tensor, targets: Tensor, gamma: float) -> Tensor:
    log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


class FocalClient(ClientMethod):
    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        return focal_loss(model(x), y, self.cfg.focal_gamma)
