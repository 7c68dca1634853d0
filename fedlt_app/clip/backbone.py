"""The frozen CLIP: loaded from a local OpenAI-format file, shared per process, fed fedlt's images.

Nothing is ever downloaded: the weights are the file the ``clip-weights`` key
names (OpenAI's ``ViT-B-16.pt`` and its kin, a TorchScript archive or a plain
state dict with OpenAI's key names; open_clip infers the architecture from the
keys). fedlt's data path hands the model its usual float tensors (MNIST-type
in [0, 1], CIFAR normalised with its own mean/std); :class:`CLIPInput` turns
them into what CLIP was trained on inside the model, so training, evaluation
and every other method's data path stay as they are.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedlt_app.data.transforms import normalisation

WEIGHTS_KEY = "clip-weights"
EXTRA_HINT = 'pip install -e ".[clip]"'
WEIGHTS_HINT = ("an OpenAI-format CLIP archive, e.g. ViT-B-16.pt from OpenAI's CLIP release (README, "
                "'CLIP methods: weights')")
# CLIP's own input statistics (open_clip.constants.OPENAI_DATASET_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPUnavailable(RuntimeError):
    """The optional extra is missing or the weights file is not there; the message says how to fix it."""


def require_open_clip() -> ModuleType:
    """Import open_clip or say which extra provides it."""
    try:
        import open_clip
    except ImportError as err:
        raise CLIPUnavailable(f"{WEIGHTS_KEY}: the CLIP methods need the optional extra open-clip-torch "
                              f"({EXTRA_HINT})") from err
    return open_clip


def weights_path(path: str) -> Path:
    """The weights file as an absolute path, or a clear error.

    Absolute on purpose: open_clip downloads when handed a bare model name
    ("ViT-B-16"), so a relative name must never reach it.
    """
    if not path:
        raise CLIPUnavailable(f"{WEIGHTS_KEY}: empty; name a local file holding {WEIGHTS_HINT}")
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise CLIPUnavailable(f"{WEIGHTS_KEY}: no file at {resolved}; it must hold {WEIGHTS_HINT}")
    return resolved


# One frozen CLIP per (file, device) and process: every virtual client a Ray
# worker serves, and every model object built in it, shares these weights.
_BACKBONES: dict[tuple[str, str], nn.Module] = {}


def load_clip(path: str, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen CLIP in ``path`` (fp32, eval mode, no gradients), loaded once per process and device."""
    open_clip = require_open_clip()
    resolved = weights_path(path)
    key = (str(resolved), str(torch.device(device)))
    if key not in _BACKBONES:
        # Building the architecture draws random initial weights before the file's replace them; without the
        # fork those draws would move the global stream only in the process's first load, so a model seeded
        # before this call (PromptFL's random context, after ``initial_model``'s seed) would depend on
        # whether an earlier run in the process had loaded CLIP already.
        with torch.random.fork_rng():
            model = open_clip.load_openai_model(str(resolved), precision="fp32", device=str(torch.device(device)))
        model.eval().requires_grad_(False)
        _BACKBONES[key] = model
    return _BACKBONES[key]


def vision_size(clip: nn.Module) -> tuple[int, int]:
    """(height, width) the vision tower was built for."""
    size = clip.visual.image_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class CLIPInput(nn.Module):
    """fedlt's float images -> CLIP's input: undo the data set's normalisation, grey to RGB,
    bicubic resize to the vision tower's size (clamped to [0, 1] as an 8-bit image would be),
    then CLIP's mean/std. No parameters, nothing to travel."""

    def __init__(self, dataset: str, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        mean, std = normalisation(dataset)
        self.register_buffer("data_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("data_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.data_std + self.data_mean
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
        return (x - self.clip_mean) / self.clip_std


class CLIPImageEncoder(nn.Module):
    """h = the L2-normalised CLIP image embedding of fedlt's input batch."""

    def __init__(self, clip: nn.Module, dataset: str) -> None:
        super().__init__()
        self.clip = clip
        self.transform = CLIPInput(dataset, vision_size(clip))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.clip.encode_image(self.transform(x)), dim=-1)


def embed_dim(clip: nn.Module) -> int:
    """Width of CLIP's joint image-text space."""
    projection = clip.text_projection
    return int(projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1])
