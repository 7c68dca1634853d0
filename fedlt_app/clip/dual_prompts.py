"""CAPT's model (Hou et al., 2025): a general prompt and class-aware prompts on a frozen CLIP.

Text prompt of class c (the code's ``CLASS_TOKEN_POSITION="end"``):
[SOS] g_1 … g_{n_g} a_{c,1} … a_{c,n_ctx−n_g} [tokens of "name ."] [EOS], with the general prompt g
(n_g, D_t) shared by every class and the class-aware prompts a (C, n_ctx − n_g, D_t); both 𝒩(0, 0.02²).
The coupling function F, a trainable Linear(D_t → D_v), maps g to n_g visual prompt tokens, appended
after [CLS] + patches (which carry their positional embeddings; the prompts get none) and before
``ln_pre``: shallow VPT at the input layer (the code's ``VisionTransformer_CAPT``). Image features are
``ln_post(token 0) @ proj``. Logits exp(logit_scale)·cos(f(x), t_c). Only g, a and F train and travel:
their names are ``prompts.general``, ``prompts.class_aware``, ``prompts.coupling.{weight,bias}``.

ViT towers only (the code's RN50 branch cannot run: its mapped prompt does not broadcast).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedlt_app.clip.model import CONTEXT_INIT_STD, CLIPClassifier, PromptTemplate


def prompted_image_features(clip: nn.Module, pixels: Tensor, prompts: Tensor) -> Tensor:
    """CLIP's ViT image embedding with ``prompts`` (n, D_v) appended to the embedded tokens before ``ln_pre``.

    open_clip's ``_embeds`` applies ``ln_pre`` itself, so the embed step is written out here; with no
    prompt (n = 0) this is open_clip's ``encode_image``.
    """
    visual = clip.visual
    if not hasattr(visual, "conv1"):
        raise ValueError("clip-weights: CAPT needs a ViT vision tower (e.g. ViT-B-16.pt); "
                         "the code's ResNet branch cannot run (README 'CAPT')")
    x = visual.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid², width)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = torch.cat([x, prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    x = visual.transformer(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


class DualPrompts(nn.Module):
    """g (n_g, D_t), a (C, n_ctx − n_g, D_t) and F: Linear(D_t → D_v): everything CAPT trains."""

    def __init__(self, num_classes: int, n_ctx: int, n_general: int, text_width: int, vision_width: int) -> None:
        super().__init__()
        if not 1 <= n_general < n_ctx:
            raise ValueError(f"capt-n-general: must be in [1, capt-n-ctx={n_ctx}) (got {n_general})")
        self.general = nn.Parameter(torch.randn(n_general, text_width) * CONTEXT_INIT_STD)
        self.class_aware = nn.Parameter(torch.randn(num_classes, n_ctx - n_general, text_width) * CONTEXT_INIT_STD)
        self.coupling = nn.Linear(text_width, vision_width)

    def context(self) -> Tensor:
        """The learned rows of every class's prompt: [g, a_c] (C, n_ctx, D_t)."""
        general = self.general.unsqueeze(0).expand(self.class_aware.shape[0], -1, -1)
        return torch.cat([general, self.class_aware], dim=1)

    def visual(self) -> Tensor:
        """F(g): the n_g visual prompt tokens (n_g, D_v)."""
        return self.coupling(self.general)


class DualPromptCLIP(CLIPClassifier):
    """CAPT's network on the frozen CLIP; ``forward`` gives the logits, the loss also reads its parts."""

    def __init__(self, clip: nn.Module, dataset: str, names: tuple[str, ...], n_ctx: int, n_general: int) -> None:
        # the inherited encoder's input transform is used; its unprompted forward is not
        template = PromptTemplate(clip, names, n_ctx)
        super().__init__(clip, dataset, template, len(names))
        text_width = clip.token_embedding.weight.shape[1]
        self.prompts = DualPrompts(len(names), n_ctx, n_general, text_width, clip.visual.conv1.out_channels)

    def image_features(self, x: Tensor) -> Tensor:
        """f̂(x): the L2-normalised prompted image embedding of fedlt's input batch."""
        return F.normalize(prompted_image_features(self.clip, self.encoder.transform(x), self.prompts.visual()), dim=-1)

    def text_features(self) -> Tensor:
        """t̂_c for every class (C, embed_dim), through the frozen text tower."""
        return self.classifier.encode(self.prompts.context())

    def logits_of(self, features: Tensor, text: Tensor | None = None) -> Tensor:
        """exp(logit_scale)·⟨f̂, t̂_c⟩ (``text``: the text features when the caller has them already)."""
        text = self.text_features() if text is None else text
        return (self.clip.logit_scale.exp() * features @ text.to(features.dtype).t()).float()

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_of(self.image_features(x))
