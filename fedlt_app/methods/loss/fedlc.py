"""FedLC: federated learning via logits calibration (Zhang et al., ICML 2022).

Each client subtracts a class-wise margin from its logits before the
softmax cross-entropy, the margin growing as the class gets rarer *on that
client*:

    z̃_c = z_c − τ · n_{k,c}^(−1/4),    loss = CE(z̃, y)

with n_{k,c} client k's training count of class c (counted once, in
``begin``, from the client's own labels). Only the local loss changes: the
server is plain FedAvg and inference (``model(x)``) uses the uncalibrated
logits.

Source. No code from the authors could be found (Flower's FedLC baseline,
too, takes its τ from other ports). This follows
FedLTLib (github.com/gzhu-hcai/LongTailLib, ``system/flcore/clients/
clientlc.py`` and ``system/flcore/servers/serverlc.py``):
``loss = CrossEntropyLoss(output − τ·count^(−1/4), y)``, τ default 1.0
(``system/main.py``: ``--tau``, default 1.0).

Disagreements and what this module does:

* Whose counts. The paper's n_{c,y} is client c's own count. FedLTLib's
  server sums ``sample_per_class`` over *all* clients and gives every client
  the same global calibration (a global logit adjustment, and it needs every
  client's label counts on the server). We follow the paper: each client's
  own counts, which also needs nothing beyond the client's data. (FL-bench,
  FedDecorr's ``fedlogitcal`` and Flower's baseline also use local counts.)
* Normaliser. The paper's Eq. (as we read it; the paper text was not
  retrievable to re-check here) writes the calibrated loss as
  −log(e^{z̃_y} / Σ_{y'≠y} e^{z̃_y'}), the target excluded from the
  denominator; FedLTLib (its live code; a commented-out variant excludes the
  target), FL-bench, FedDecorr and Flower's baseline all use the ordinary
  softmax cross-entropy over every class. We follow the code: plain CE on the
  calibrated logits (the excluded-target form is unbounded below).
* Classes a client lacks (n = 0). FedLTLib computes ``count ** (-1/4)`` in
  floating point, so n = 0 gives an infinite margin: the class's calibrated
  logit is −∞ and it drops out of the softmax (its logit gets no gradient).
  We do the same. (FL-bench clamps n to 1e-8 instead: a finite margin of
  100·τ, nearly the same.) At τ = 0 FedLTLib's 0·∞ would be NaN; here τ = 0
  gives no margin at all, i.e. exactly FedAvg+CE.
* τ. Flower's baseline README says the paper does not specify it (not
  re-checked against the paper here); FedLTLib's default is 1.0 (FedDecorr's ``calibration_temp`` 0.1, Flower's
  baseline 0.5). We use FedLTLib's 1.0.
* FedLTLib tiles the calibration to ``batch_size`` rows (it relies on
  ``drop_last=True``); we broadcast, so a short last batch is calibrated too.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.methods.base import ClientMethod
from fedlt_app.models import EncoderClassifier


def calibration_margins(class_counts: Tensor, tau: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """τ · n_c^(−1/4) per class; +∞ for a class with n_c = 0 (0 for every class when τ = 0)."""
    counts = class_counts.to(dtype)
    if tau == 0:
        return torch.zeros_like(counts)
    return tau * counts.pow(-0.25)  # 0 ** -0.25 = inf, as in FedLTLib


def calibrated_logits(logits: Tensor, class_counts: Tensor, tau: float) -> Tensor:
    """z_c − τ · n_c^(−1/4) for every row of ``logits`` (classes with n_c = 0 become −∞)."""
    return logits - calibration_margins(class_counts, tau, logits.dtype).to(logits.device)


def calibrated_loss(logits: Tensor, targets: Tensor, class_counts: Tensor, tau: float) -> Tensor:
    """FedLC's local loss: mean cross-entropy on the calibrated logits."""
    return F.cross_entropy(calibrated_logits(logits, class_counts, tau), targets)


class FedLCClient(ClientMethod):
    class_counts: Tensor

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        counts = torch.bincount(labels.reshape(-1).long().cpu(), minlength=self.num_classes)
        device = next(model.parameters()).device
        self.class_counts = counts.to(device)

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        return calibrated_loss(model(x), y, self.class_counts, self.cfg.fedlc_tau)
