"""CLIP-based methods: zero-shot CLIP (the reference) and PromptFL (federated CoOp).

* ``zero-shot-clip``: no training at all; the server evaluates CLIP with the
  prompts "a photo of a {class}.". Clients are never asked to train
  (``ServerMethod.asks_clients_to_train``), so they never load CLIP either.
* ``promptfl`` (Guo et al., 2023): every client trains CoOp's shared context
  vectors on the frozen CLIP with plain cross-entropy; the server averages the
  context (FedAvg by sample count). Only the context travels.

The models are built here from the run config (``Method.build``); open_clip is
imported only when one is built.
"""

from __future__ import annotations

import torch

from fedlt_app.clip.backbone import load_clip
from fedlt_app.clip.classnames import class_names
from fedlt_app.clip.model import CLIPClassifier, ContextPromptHead, ZeroShotHead
from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData
from fedlt_app.methods.base import ServerMethod
from fedlt_app.models import EncoderClassifier


def zero_shot_model(cfg: RunConfig, data: FederatedData, device: torch.device) -> EncoderClassifier:
    clip = load_clip(cfg.clip_weights, device)
    names = class_names(cfg.dataset, data.num_classes)
    return CLIPClassifier(clip, cfg.dataset, ZeroShotHead(clip, names), data.num_classes).to(device)


def promptfl_model(cfg: RunConfig, data: FederatedData, device: torch.device) -> EncoderClassifier:
    clip = load_clip(cfg.clip_weights, device)
    names = class_names(cfg.dataset, data.num_classes)
    return CLIPClassifier(clip, cfg.dataset, ContextPromptHead(clip, names, cfg.promptfl_n_ctx),
                          data.num_classes).to(device)


class ZeroShotServer(ServerMethod):
    """Nothing to learn: rounds only evaluate the fixed zero-shot classifier."""

    asks_clients_to_train = False
