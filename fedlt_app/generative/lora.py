"""ReGL's adaptive fine-tuning: LoRA on the pipeline's UNet, trained on the client's own images.

The UNet, the text encoder and the VAE stay frozen; LoRA adapters on the UNet's attention projections
(``to_q``, ``to_k``, ``to_v``, ``to_out.0``) learn the standard epsilon- (or v-) prediction loss on the
client's real images, resized to the generator's resolution, each conditioned on its class prompt. The
adapter lives only in this client's in-memory pipeline: it is never saved, sent or cached (the cached
images are what it produced). The paper's "multimodal conditioning" (an image condition besides the text)
is not confirmed and not implemented: text only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "regl"


def pipeline_pixels(images: Tensor, resolution: int) -> Tensor:
    """fedlt's uint8 images (N, C, H, W) -> the VAE's input: RGB in [-1, 1] at ``resolution``."""
    x = images.float() / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return x * 2.0 - 1.0


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str]) -> Tensor:
    """The text encoder's hidden states for each prompt (the UNet's cross-attention condition)."""
    tokens = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    return pipe.text_encoder(tokens.input_ids.to(pipe.device))[0]


def add_adapter(unet: Any, rank: int) -> list[torch.nn.Parameter]:
    """Freeze ``unet`` and give it a LoRA adapter of ``rank`` (alpha = rank); returns the adapter's parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGET_MODULES)),
                     adapter_name=ADAPTER_NAME)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # trained in float32 even when the pipeline runs in float16 (diffusers' LoRA recipe)
        p.data = p.data.float()
    return params


def adapter_state(unet: Any) -> dict[str, Tensor]:
    """The adapter's tensors alone (``save_pretrained`` of an adapted UNet writes keys that do not reload)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)


def adapt(pipe: Any, images: Tensor, labels: Tensor, class_prompts: Sequence[str], *, rank: int, steps: int,
          lr: float, batch_size: int, resolution: int, generator: torch.Generator) -> list[float]:
    """Train a LoRA adapter of ``pipe.unet`` on (``images``, ``labels``) in place; returns the step losses.

    ``class_prompts[c]`` conditions the images of class c. Draws (batches, VAE samples, noise, time steps)
    come from ``generator`` (CPU), so a (seed, client) pair replays the same adaptation.
    """
    from diffusers import DDPMScheduler

    unet, vae, device = pipe.unet, pipe.vae, pipe.device
    vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    params = add_adapter(unet, rank)
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_schedule.config.prediction_type
    present = sorted(int(c) for c in labels.unique())
    text = encode_prompts(pipe, [class_prompts[c] for c in present])
    row_of = torch.full((len(class_prompts),), -1, dtype=torch.long)
    row_of[present] = torch.arange(len(present))
    optimizer = torch.optim.AdamW(params, lr=lr)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    losses = []
    unet.train()
    for _ in range(steps):
        batch = torch.randint(len(labels), (min(batch_size, len(labels)),), generator=generator)
        pixels = pipeline_pixels(images[batch], resolution).to(device, vae.dtype)
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
            latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(
                device, posterior.mean.dtype)) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        timesteps = torch.randint(noise_schedule.config.num_train_timesteps, (len(batch),),
                                  generator=generator).to(device)
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        target = noise if prediction == "epsilon" else noise_schedule.get_velocity(latents, noise, timesteps)
        with autocast:
            predicted = unet(noisy, timesteps, encoder_hidden_states=text[row_of[labels[batch]]]).sample
        loss = F.mse_loss(predicted.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    unet.eval()
    if device.type == "cuda":  # the adapter was trained in float32; the pipeline samples in its own dtype
        for p in params:
            p.data = p.data.to(vae.dtype)
    unet.requires_grad_(False)
    return losses
