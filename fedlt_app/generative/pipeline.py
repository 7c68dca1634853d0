"""The client's text-to-image pipeline: a local diffusers folder, loaded with no network access.

Nothing is ever downloaded: ``regl-generator`` names a folder written by diffusers' ``save_pretrained``
(``model_index.json`` and one sub-folder per component, e.g. a Stable Diffusion checkpoint), read with
``local_files_only=True`` and the Hub switched offline. A missing folder or a missing extra stops the run
with a message naming the key and how to get what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

GENERATOR_KEY = "regl-generator"
EXTRA_HINT = 'pip install -e ".[regl]"'
WEIGHTS_HINT = ("a local diffusers pipeline folder (model_index.json and its components), e.g. Stable Diffusion "
                "v1.5 or 2.1-base saved with save_pretrained or downloaded once with huggingface-cli on a "
                "machine with a network (README 'ReGL: weights')")
POLL_SECONDS = 1.0


class GeneratorUnavailable(RuntimeError):
    """The optional extra is missing or the pipeline folder is not there; the message says how to fix it."""


def require_diffusers() -> ModuleType:
    """Import diffusers (and check peft and transformers are there) or say which extra provides them."""
    try:
        import diffusers
        import peft  # noqa: F401 - LoRA adaptation
        import transformers  # noqa: F401 - the text encoder and tokenizer
    except ImportError as err:
        raise GeneratorUnavailable(f"{GENERATOR_KEY}: synthetic-data=regl needs the optional extra regl "
                                   f"(diffusers, peft, transformers, accelerate; {EXTRA_HINT}); missing: "
                                   f"{err.name}") from err
    return diffusers


def generator_dir(path: str) -> Path:
    """The pipeline folder as an absolute path, or a clear error naming the key."""
    if not path:
        raise GeneratorUnavailable(f"{GENERATOR_KEY}: empty; name {WEIGHTS_HINT}")
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise GeneratorUnavailable(f"{GENERATOR_KEY}: no folder at {resolved}; it must be {WEIGHTS_HINT}")
    if not (resolved / "model_index.json").is_file():
        raise GeneratorUnavailable(f"{GENERATOR_KEY}: {resolved} has no model_index.json; it must be {WEIGHTS_HINT}")
    return resolved


def fingerprint(path: str) -> str:
    """A digest of the pipeline folder that changes when any file in it does (name, size, modification time).

    Cheap on purpose (a Stable Diffusion folder holds gigabytes): the files are listed, not read.
    """
    root = generator_dir(path)
    entries = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = file.stat()
        entries.append([file.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps([str(root), entries]).encode()).hexdigest()


def pipeline_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (Stable Diffusion's usual inference precision), float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_pipeline(path: str, device: torch.device) -> Any:
    """The text-to-image pipeline in ``path``, on ``device``, without any network access.

    The safety checker is not loaded (``safety_checker=None``): it would blank images, which are training
    data here, and it needs its own weights.
    """
    diffusers = require_diffusers()
    root = generator_dir(path)
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: local_files_only already forbids downloads
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(root), local_files_only=True, safety_checker=None,
                                                           dtype=pipeline_dtype(device))
    except (OSError, ValueError) as err:
        raise GeneratorUnavailable(f"{GENERATOR_KEY}: {root} could not be loaded as a diffusers pipeline "
                                   f"({err}); it must be {WEIGHTS_HINT}") from err
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        if getattr(pipe, part, None) is None:
            raise GeneratorUnavailable(f"{GENERATOR_KEY}: {root} is a {type(pipe).__name__} without a {part}; "
                                       "ReGL needs a Stable-Diffusion-type text-to-image pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@contextlib.contextmanager
def generator_slot(directory: Path, slots: int) -> Iterator[None]:
    """Hold one of ``slots`` machine-wide slots (file locks in ``directory``) while inside.

    Clients sharing a machine (and its GPU) share the cache directory, so at most ``slots`` of them load a
    pipeline at a time; the others wait. Without ``fcntl`` (Windows) there is no throttle.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms Flower's simulation runs on
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    while True:
        for slot in range(slots):
            handle = open(directory / f".regl-slot-{slot}.lock", "a+")  # noqa: SIM115 - held past this block
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(POLL_SECONDS)
