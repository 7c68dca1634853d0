"""CLIP as an ``EncoderClassifier``: frozen image tower as h, a text-derived head as W.

* :class:`ZeroShotHead`: W = the encoded prompts "a photo of a {class}." (fixed).
* :class:`ContextPromptHead`: CoOp's learnable context (PromptFL): the prompt of
  class c is [SOS] v_1 … v_M [tokens of "name ."] [EOS], v shared by all classes,
  sent through the frozen text tower on every forward.

Logits are exp(logit_scale)·cos(h, t_c), CLIP's. Only parameters that require
gradients travel (:meth:`CLIPClassifier.travelling_state`): the frozen CLIP
stays on every node.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedlt_app.clip.backbone import CLIPImageEncoder, embed_dim, require_open_clip
from fedlt_app.clip.classnames import PROMPT_TEMPLATE, prompts
from fedlt_app.models import EncoderClassifier

CONTEXT_INIT_STD = 0.02  # CoOp's random context initialisation, N(0, 0.02²)


def tokenize(clip: nn.Module, texts: list[str]) -> Tensor:
    """CLIP's BPE tokens (the vocabulary ships inside the open_clip wheel: offline)."""
    open_clip = require_open_clip()
    return open_clip.tokenize(texts, context_length=clip.context_length).to(clip.positional_embedding.device)


def encode_token_embeddings(clip: nn.Module, embeddings: Tensor, tokens: Tensor) -> Tensor:
    """CLIP's text tower from token embeddings on (open_clip's ``encode_text`` after its lookup).

    Pools at the end-of-text token (the largest id) and projects into the joint space.
    """
    x = embeddings + clip.positional_embedding.to(embeddings.dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    projection = clip.text_projection
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


class ZeroShotHead(nn.Module):
    """Fixed class embeddings from hand-written prompts; nothing to train."""

    def __init__(self, clip: nn.Module, names: tuple[str, ...], template: str = PROMPT_TEMPLATE) -> None:
        super().__init__()
        with torch.no_grad():
            text = F.normalize(clip.encode_text(tokenize(clip, prompts(names, template))), dim=-1)
        self.register_buffer("text_features", text, persistent=False)
        self.register_buffer("scale", clip.logit_scale.detach().exp(), persistent=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.scale * h @ self.text_features.to(h.dtype).t()


class PromptTemplate(nn.Module):
    """CoOp's splice: [SOS] v_1 … v_M [tokens of "name ."] [EOS] for every class, v given per call.

    Holds the frozen pieces (token ids, the [SOS] row, the rows after the M placeholders); :meth:`encode`
    puts learned rows (C, M, width) in positions 1..M and runs the frozen text tower.
    """

    def __init__(self, clip: nn.Module, names: tuple[str, ...], n_ctx: int) -> None:
        super().__init__()
        self.clip = clip
        self.n_ctx = n_ctx
        placeholder = " ".join(["X"] * n_ctx)
        tokens = tokenize(clip, [f"{placeholder} {name}." for name in names])
        with torch.no_grad():
            embedded = clip.token_embedding(tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :1], persistent=False)  # [SOS]
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :], persistent=False)  # name . [EOS] padding

    def embeddings(self, context: Tensor) -> Tensor:
        """The token embeddings (C, context_length, width) with ``context`` (C, M, width) spliced in."""
        return torch.cat([self.prefix, context.to(self.prefix.dtype), self.suffix], dim=1)

    def encode(self, context: Tensor) -> Tensor:
        """t_c for every class, L2-normalised (C, embed_dim)."""
        return F.normalize(encode_token_embeddings(self.clip, self.embeddings(context), self.tokens), dim=-1)


class ContextPromptHead(nn.Module):
    """CoOp/PromptFL: M learnable context vectors shared by every class, class token at the end."""

    def __init__(self, clip: nn.Module, names: tuple[str, ...], n_ctx: int) -> None:
        super().__init__()
        self.clip = clip
        self.template = PromptTemplate(clip, names, n_ctx)
        width = clip.token_embedding.weight.shape[1]
        self.context = nn.Parameter(torch.randn(n_ctx, width) * CONTEXT_INIT_STD)

    def class_embeddings(self) -> Tensor:
        """t_c for every class, L2-normalised (C, embed_dim)."""
        return self.template.encode(self.context.unsqueeze(0).expand(self.template.prefix.shape[0], -1, -1))

    def forward(self, h: Tensor) -> Tensor:
        return self.clip.logit_scale.exp() * h @ self.class_embeddings().to(h.dtype).t()


class CLIPClassifier(EncoderClassifier):
    """``classifier(encoder(x))`` on a frozen CLIP; only parameters that train travel."""

    def __init__(self, clip: nn.Module, dataset: str, head: nn.Module, num_classes: int) -> None:
        super().__init__(CLIPImageEncoder(clip, dataset), embed_dim(clip), num_classes, classifier=head)
        self.clip = clip

    def train(self, mode: bool = True) -> CLIPClassifier:
        """The frozen CLIP stays in eval mode whatever the loop asks (its dropout, if any, stays off)."""
        super().train(mode)
        self.clip.eval()
        return self

    def travelling_keys(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def travelling_state(self) -> dict[str, Tensor]:
        params = dict(self.named_parameters())
        return {name: params[name].detach() for name in self.travelling_keys()}

    def load_travelling_state(self, state: Mapping[str, Tensor]) -> None:
        expected = set(self.travelling_keys())
        if set(state) != expected:
            raise KeyError(f"CLIP model: expected exactly the trainable state {sorted(expected)}, "
                           f"got {sorted(state)}")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
