"""CLIP2FL (Shi et al., AAAI 2024): CReFF with a frozen CLIP as the clients' teacher and the server's text anchor.

Follows the authors' code (shijiangming1/CLIP2FL, ``main.py``, ``losses.py``, ``options.py``):

* **Client**: the run's own network (``model``; the code: a ResNet-8 with 512-d features) trains with
  CE(z, y) + α·T²·KL(softmax(z_clip/T) ‖ softmax(z/T)) (``KDLoss``, batch mean; α = 2, T = 3), z_clip the
  frozen CLIP's zero-shot logits exp(logit_scale)·cos(image, "a photo of a {class}") (100·cos for OpenAI's
  weights, the code's fixed 100; its template has no full stop). The code defines a class-balanced ``BKD2Loss``
  but trains with the plain ``KDLoss``; so does this. Before training, CReFF's per-class classifier gradients.
* **Server**: CReFF's federated-feature matching with the code's text-guided term added to every matching
  step (its Eq. 8): + 0.001·SupCon_text(features, labels, text), T_ins = 0.1 (``SupConLoss_text``): for
  feature i of class y, −[s_iy − log Σ_{j≠i} e^{s_i,y_j}], s_ic = ⟨v_i, t̂_c⟩/T_ins, averaged over features
  with a same-class partner. Computed per class rather than over the code's N × N matrix (the same value:
  every feature of class c meets n_c copies of t̂_c), with each feature paired with its own class's text (the
  code repeats every text 100 times, aligned only at its default of 100 features per class). The features
  are not normalised (the code). Then the classifier is re-trained on the features and evaluates, as CReFF.

The term needs the network's feature width to equal CLIP's embedding width (512 for ViT-B/32 and ViT-B/16:
``model=cnn-mcmahan``); ``clip2fl-contrast-weight=0`` lifts that (CReFF + CLIP distillation only).
CLIP's input is the augmented training batch (the code: the un-augmented image, CLIP's own preprocessing).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.clip.backbone import embed_dim, load_clip
from fedlt_app.clip.classnames import class_names
from fedlt_app.clip.model import CLIPClassifier, ZeroShotHead
from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.methods.decoupled.creff import CReFFClient, CReFFServer
from fedlt_app.models import EncoderClassifier

TEACHER_TEMPLATE = "a photo of a {}"  # the code's prompt (no full stop)

# One teacher per (weights, dataset, classes, device) and process; its CLIP is load_clip's shared copy.
_TEACHERS: dict[tuple[str, str, int, str], CLIPClassifier] = {}


def clip_teacher(cfg: RunConfig, num_classes: int, device: torch.device) -> CLIPClassifier:
    """The frozen zero-shot CLIP classifier with the code's prompt, built once per process."""
    key = (cfg.clip_weights, cfg.dataset, num_classes, str(device))
    if key not in _TEACHERS:
        clip = load_clip(cfg.clip_weights, device)
        head = ZeroShotHead(clip, class_names(cfg.dataset, num_classes), TEACHER_TEMPLATE)
        _TEACHERS[key] = CLIPClassifier(clip, cfg.dataset, head, num_classes).to(device).eval()
    return _TEACHERS[key]


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """The code's KDLoss: T²·KL(softmax(teacher/T) ‖ softmax(student/T)), mean over the batch."""
    return F.kl_div(F.log_softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1),
                    reduction="batchmean") * temperature**2


def text_contrastive_loss(features: Tensor, labels: Tensor, text: Tensor, temperature: float) -> Tensor:
    """The code's SupConLoss_text with row i of its text matrix = t̂ of feature i's class.

    ``text``: (C, d) class text features. Anchors without a same-class partner are left out, as in the code.
    """
    num_classes = text.shape[0]
    similarity = features @ text.t() / temperature  # (N, C)
    counts = torch.bincount(labels, minlength=num_classes).to(similarity.dtype)
    copies = counts.unsqueeze(0) - F.one_hot(labels, num_classes).to(similarity.dtype)  # j ≠ i, per class
    log_denominator = torch.logsumexp(similarity + torch.log(copies), dim=1)
    log_prob = similarity.gather(1, labels.unsqueeze(1)).squeeze(1) - log_denominator
    paired = copies.gather(1, labels.unsqueeze(1)).squeeze(1) > 0
    return -(log_prob[paired]).sum() / paired.sum().clamp(min=1)


class CLIP2FLClient(CReFFClient):
    """CReFF's client (real gradients before training) with CLIP's zero-shot logits distilled into the network."""

    def begin(self, model: EncoderClassifier, images: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        super().begin(model, images, labels, generator)
        self._teacher = clip_teacher(self.cfg, self.num_classes, next(model.parameters()).device)

    def loss(self, model: EncoderClassifier, x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)
        with torch.no_grad():
            teacher = self._teacher(x).float()
        return F.cross_entropy(logits, y) + self.cfg.clip2fl_alpha * distillation_loss(
            logits, teacher, self.cfg.clip2fl_temperature)


class CLIP2FLServer(CReFFServer):
    """CReFF's server with the text-guided contrastive term in every feature-matching step."""

    def __init__(self, cfg: RunConfig, model: EncoderClassifier, data: FederatedData) -> None:
        super().__init__(cfg, model, data)
        self.text = torch.zeros(self.num_classes, model.feature_dim)
        if cfg.clip2fl_contrast_weight > 0:
            teacher = clip_teacher(cfg, self.num_classes, next(model.parameters()).device)
            if embed_dim(teacher.clip) != model.feature_dim:
                raise ValueError(f"clip2fl-contrast-weight: the text-guided term compares the {model.feature_dim}-d "
                                 f"features of model={cfg.model!r} with CLIP's {embed_dim(teacher.clip)}-d text "
                                 "features; use a model of CLIP's width (cnn-mcmahan: 512) or "
                                 "clip2fl-contrast-weight=0")
            self.text = teacher.classifier.text_features.detach().float().cpu().clone()
        self.last_contrast_loss = float("nan")

    def matching_loss(self, real: dict[int, tuple[Tensor, Tensor]]) -> Tensor:
        loss = super().matching_loss(real)
        if self.cfg.clip2fl_contrast_weight > 0:
            contrast = text_contrastive_loss(self.features, self.feature_labels, self.text,
                                             self.cfg.clip2fl_contrast_temperature)
            self.last_contrast_loss = float(contrast.detach())
            loss = loss + self.cfg.clip2fl_contrast_weight * contrast
        return loss

    def round_metrics(self) -> dict[str, float | int]:
        return {**super().round_metrics(), "clip2fl_contrast_loss": self.last_contrast_loss}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_contrast_loss": self.last_contrast_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.last_contrast_loss = state["last_contrast_loss"]
