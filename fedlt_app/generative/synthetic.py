"""ReGL's synthetic images: generated per (seed, client, class, index), converted, cached, joined to real data.

For each class c a client lacks d_c images of (:mod:`.shortfall`), it generates d_c images from the
prompt ``regl-prompt`` with the class's name, each from its own seeded generator, so an image depends
only on (seed, client, class, index) and the pipeline, never on batching or on the other classes (runs of
two methods with one seed train on the same images). Images are converted to the run's data set (its
size, its channels, uint8 as the loaders give them) and labelled c; the existing data path normalises and
augments them like real images. They are written once per client to ``regl-cache-dir`` under a digest of
everything that determines them (atomic replace) and never leave the client.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log
from torch import Tensor
from torch.nn import functional as F

from fedlt_app.clip.classnames import CLASS_NAMES
from fedlt_app.config import RunConfig
from fedlt_app.data import FederatedData

from .pipeline import fingerprint, generator_slot, load_pipeline, pipeline_dtype, require_diffusers
from .shortfall import class_counts, shortfall

CACHE_FORMAT = 1  # bump when the generation or conversion changes what a key's images are
REGL_STREAM = 0x7265676C  # "regl": tags the synthetic images' seed sequences
LORA_STREAM = 0x6C6F7261  # "lora": the adaptation's draws
CLASS_PLACEHOLDER = "{class}"
# Luminance of an RGB image as PIL's "L" mode (ITU-R 601-2).
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True, eq=False)
class SyntheticSet:
    """One client's synthetic images and what it took to get them."""

    images: Tensor  # uint8, (N, C, H, W): the data set's shape
    labels: Tensor  # int64, (N,)
    num_real: int
    seconds: float  # generation (or cache read) time
    cached: bool  # read from the cache, nothing generated

    def metrics(self) -> dict[str, int | float]:
        return {"num-real": self.num_real, "num-synthetic": len(self.labels), "generate-seconds": self.seconds,
                "cached": int(self.cached)}


def cache_dir(cfg: RunConfig) -> Path:
    """``regl-cache-dir``, by default ~/.cache/fedlt/regl (shared by every run and client on the machine)."""
    if cfg.regl_cache_dir:
        return Path(cfg.regl_cache_dir).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedlt" / "regl"


def class_prompts(template: str, dataset: str, num_classes: int) -> list[str]:
    """``regl-prompt`` with each class's name (the names CLIP methods use) in label order."""
    names = CLASS_NAMES.get(dataset)
    if names is None or len(names) != num_classes:
        raise ValueError(f"dataset: no class names for {dataset!r} with {num_classes} classes (ReGL's prompts)")
    return [template.replace(CLASS_PLACEHOLDER, name) for name in names]


def image_seed(seed: int, partition_id: int, label: int, index: int) -> int:
    """The seed of one synthetic image, a pure function of (run seed, client, class, index)."""
    return int(np.random.SeedSequence([seed, REGL_STREAM, partition_id, label, index]).generate_state(1)[0])


def to_dataset_images(rgb: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """The pipeline's RGB floats in [0, 1], (N, 3, h, w) -> uint8 images of ``shape`` = (C, H, W).

    Resized with antialiased bilinear filtering; one channel is the luminance (PIL's "L").
    """
    channels, height, width = shape
    x = rgb.float().clamp(0.0, 1.0)
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    if channels == 1:
        x = (x * torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    elif channels != 3:
        raise ValueError(f"dataset: images with {channels} channels cannot take generated RGB images")
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def resolution(cfg: RunConfig, pipe: Any) -> int:
    """``regl-resolution``, or the pipeline's native size (UNet sample size x VAE scale) when 0."""
    if cfg.regl_resolution:
        return cfg.regl_resolution
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def generate(pipe: Any, cfg: RunConfig, deficits: np.ndarray, prompts: list[str], partition_id: int,
             shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """d_c images of every class c, converted to ``shape``; (uint8 images, labels) in class order."""
    size = resolution(cfg, pipe)
    chunks, labels = [], []
    for label in np.flatnonzero(deficits):
        count = int(deficits[label])
        for start in range(0, count, cfg.regl_batch_size):
            indices = range(start, min(start + cfg.regl_batch_size, count))
            generators = [torch.Generator().manual_seed(image_seed(cfg.seed, partition_id, int(label), i))
                          for i in indices]
            output = pipe(prompt=[prompts[label]] * len(indices),
                          negative_prompt=[cfg.regl_negative_prompt] * len(indices) if cfg.regl_negative_prompt
                          else None,
                          num_inference_steps=cfg.regl_steps, guidance_scale=cfg.regl_guidance,
                          height=size, width=size, generator=generators, output_type="pt")
            chunks.append(to_dataset_images(output.images.cpu(), shape))
            labels.append(torch.full((len(indices),), int(label), dtype=torch.int64))
    if not chunks:
        return torch.empty((0, *shape), dtype=torch.uint8), torch.empty((0,), dtype=torch.int64)
    return torch.cat(chunks), torch.cat(labels)


def data_digest(images: Tensor, labels: Tensor) -> str:
    """A digest of the client's real data (what a LoRA adapter learns from)."""
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_description(cfg: RunConfig, dataset: str, shape: tuple[int, int, int], deficits: np.ndarray,
                      prompts: list[str], partition_id: int, device: torch.device, images: Tensor,
                      labels: Tensor) -> dict[str, Any]:
    """Everything that determines a client's synthetic images (its digest names the cache file)."""
    import diffusers

    described: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "generator": fingerprint(cfg.regl_generator),
        "diffusers": diffusers.__version__,
        "device": device.type,
        "dtype": str(pipeline_dtype(device)),
        "dataset": dataset,
        "shape": list(shape),
        "deficits": [int(d) for d in deficits],
        "prompts": prompts,
        "negative-prompt": cfg.regl_negative_prompt,
        "seed": cfg.seed,
        "partition-id": partition_id,
        "steps": cfg.regl_steps,
        "guidance": cfg.regl_guidance,
        "resolution": cfg.regl_resolution,
        "lora": cfg.regl_lora,
    }
    if cfg.regl_lora:
        described.update({"lora-rank": cfg.regl_lora_rank, "lora-steps": cfg.regl_lora_steps,
                          "lora-lr": cfg.regl_lora_lr, "lora-batch-size": cfg.regl_lora_batch_size,
                          "real-data": data_digest(images, labels)})
    return described


def cache_key(described: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def read_cache(path: Path) -> tuple[Tensor, Tensor] | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as archive:
        return torch.from_numpy(archive["images"].copy()), torch.from_numpy(archive["labels"].astype(np.int64))


def write_cache(path: Path, images: Tensor, labels: Tensor, described: dict[str, Any]) -> None:
    """Write atomically: a reader sees the whole file or none (a temporary file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, images=images.numpy(), labels=labels.numpy(), description=np.array(json.dumps(described)))
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(buffer.getvalue())
    os.replace(temporary, path)


# Per process: what this worker's latest clients read or generated (cache path -> images, labels), so a
# training call does not re-read the file; bounded, since one worker may serve many virtual clients.
_LOADED: dict[Path, tuple[Tensor, Tensor]] = {}
MEMO_SIZE = 4


def synthetic_data(cfg: RunConfig, data: FederatedData, images: Tensor, labels: Tensor, partition_id: int,
                   device: torch.device) -> SyntheticSet:
    """This client's synthetic images: from the cache when there, else generated (and cached)."""
    started = time.perf_counter()
    shape = tuple(int(s) for s in images.shape[1:]) if len(images) else tuple(
        int(s) for s in data.dataset.train_images.shape[1:])
    deficits = shortfall(class_counts(labels, data.num_classes), cfg.regl_target, cfg.regl_synthetic_per_class,
                         data.class_counts)
    if not deficits.any():
        empty = torch.empty((0, *shape), dtype=torch.uint8), torch.empty((0,), dtype=torch.int64)
        return SyntheticSet(*empty, num_real=len(labels), seconds=time.perf_counter() - started, cached=True)
    require_diffusers()
    prompts = class_prompts(cfg.regl_prompt, data.dataset.name, data.num_classes)
    described = cache_description(cfg, data.dataset.name, shape, deficits, prompts, partition_id, device, images,
                                  labels)
    directory = cache_dir(cfg)
    path = directory / f"regl-{cache_key(described)}.npz"
    found = _LOADED.get(path) or read_cache(path)
    cached = found is not None
    if found is None:
        with generator_slot(directory, cfg.regl_concurrent):
            found = read_cache(path)  # another process may have generated it while this one waited
            cached = found is not None
            if found is None:
                found = generate_client(cfg, deficits, prompts, partition_id, shape, device, images, labels)
                write_cache(path, *found, described)
                log(INFO, "[fedlt] regl: client %d generated %d images in %.1f s -> %s", partition_id,
                    len(found[1]), time.perf_counter() - started, path)
    _LOADED.pop(path, None)
    while len(_LOADED) >= MEMO_SIZE:
        _LOADED.pop(next(iter(_LOADED)))
    _LOADED[path] = found
    return SyntheticSet(*found, num_real=len(labels), seconds=time.perf_counter() - started, cached=cached)


def generate_client(cfg: RunConfig, deficits: np.ndarray, prompts: list[str], partition_id: int,
                    shape: tuple[int, int, int], device: torch.device, images: Tensor,
                    labels: Tensor) -> tuple[Tensor, Tensor]:
    """Load the pipeline, adapt it when ``regl-lora``, generate; the pipeline is released afterwards."""
    from .lora import adapt

    pipe = load_pipeline(cfg.regl_generator, device)
    try:
        if cfg.regl_lora:
            seed = int(np.random.SeedSequence([cfg.seed, LORA_STREAM, partition_id]).generate_state(1)[0])
            adapt(pipe, images, labels, prompts, rank=cfg.regl_lora_rank, steps=cfg.regl_lora_steps,
                  lr=cfg.regl_lora_lr, batch_size=cfg.regl_lora_batch_size, resolution=resolution(cfg, pipe),
                  generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return generate(pipe, cfg, deficits, prompts, partition_id, shape)
    finally:
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()


def with_synthetic(cfg: RunConfig, data: FederatedData, images: Tensor, labels: Tensor, partition_id: int,
                   device: torch.device) -> tuple[Tensor, Tensor, SyntheticSet | None]:
    """The client's training data: real plus synthetic under ``synthetic-data=regl``, else as given."""
    if cfg.synthetic_data != "regl":
        return images, labels, None
    synthetic = synthetic_data(cfg, data, images, labels, partition_id, device)
    return torch.cat([images, synthetic.images]), torch.cat([labels, synthetic.labels]), synthetic
