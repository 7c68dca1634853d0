"""Batched image transforms, equivalent to the authors' torchvision pipelines.

The data stay uint8 tensors until a batch is drawn; these functions then run
on the whole batch on its device, instead of per sample in DataLoader workers,
which is what makes CPU-only simulation of many clients affordable.
"""

from __future__ import annotations

import torch

from fedlt_app.config import AUGMENT_POLICIES, augment_policy_problem

_NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_GRAYSCALE = ("mnist", "fmnist", "femnist")
CROP_PADDING = 4
CUTOUT_SIZE = 16


def _check(images: torch.Tensor, dataset: str) -> None:
    if dataset not in _NORMALISATION and dataset not in _GRAYSCALE:
        allowed = ", ".join((*_GRAYSCALE, *_NORMALISATION))
        raise ValueError(f"dataset: unknown data set {dataset!r}; allowed values are {allowed}")
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected a uint8 batch of shape (N, C, H, W), got {images.dtype} {tuple(images.shape)}")


def normalisation(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that :func:`to_float` applied after scaling to [0, 1] ((0,), (1,): none).

    What a model that needs the [0, 1] image back (CLIP's input) must undo.
    """
    if dataset in _NORMALISATION:
        return _NORMALISATION[dataset]
    if dataset in _GRAYSCALE:
        return (0.0,), (1.0,)
    raise ValueError(f"dataset: unknown data set {dataset!r}; allowed values are "
                     f"{', '.join((*_GRAYSCALE, *_NORMALISATION))}")


def to_float(images_uint8: torch.Tensor, dataset: str) -> torch.Tensor:
    """ToTensor (+ Normalize for CIFAR): the evaluation-time transform.

    MNIST-type data are only scaled to [0, 1], as in the authors' code; the
    models were tuned for that input range.
    """
    _check(images_uint8, dataset)
    images = images_uint8.float().div_(255.0)
    if dataset in _NORMALISATION:
        mean, std = _NORMALISATION[dataset]
        shape = (1, len(mean), 1, 1)
        images.sub_(torch.tensor(mean, device=images.device).view(shape))
        images.div_(torch.tensor(std, device=images.device).view(shape))
    return images


def _randint(high: int, size: int, generator: torch.Generator | None) -> torch.Tensor:
    # Drawn on the CPU so that one seeded CPU generator gives the same numbers
    # whatever device the batch lives on.
    return torch.randint(0, high, (size,), generator=generator, device="cpu")


AUTHORS, CROP_FLIP = AUGMENT_POLICIES
GRAYSCALE_CROP_PADDING = 2


def check_augment_policy(policy: str, dataset: str) -> None:
    """Fail fast on an ``augment`` value that does not exist or does not fit the data set (config's rule)."""
    problem = augment_policy_problem(policy, dataset)
    if problem:
        raise ValueError(problem)


def _crop_flip(
    images_uint8: torch.Tensor, padding: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RandomCrop(size, padding) with zero padding and RandomHorizontalFlip(0.5) as one gather.

    Returns the cropped uint8 batch and the output rows and columns (for Cutout). Draws, in this order, the
    row offsets, the column offsets and the flips from ``generator`` (CIFAR's results depend on that order).
    """
    batch, channels, height, width = images_uint8.shape
    device = images_uint8.device
    offset_y = _randint(2 * padding + 1, batch, generator).to(device)
    offset_x = _randint(2 * padding + 1, batch, generator).to(device)
    flip = (torch.rand(batch, generator=generator, device="cpu") < 0.5).to(device)
    padded = torch.nn.functional.pad(images_uint8, (padding,) * 4)
    rows_out = torch.arange(height, device=device)
    cols_out = torch.arange(width, device=device)
    rows = offset_y[:, None] + rows_out  # (N, H) rows of the padded image
    # A flipped crop reads its columns right to left.
    cols = offset_x[:, None] + torch.where(flip[:, None], width - 1 - cols_out, cols_out)
    cropped = padded[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    return cropped, rows_out, cols_out


def augment(
    images_uint8: torch.Tensor, dataset: str, generator: torch.Generator | None, policy: str = AUTHORS
) -> torch.Tensor:
    """Training-time transform of a uint8 batch, as model input.

    ``policy`` is the run's ``augment`` key. ``authors`` (every paper's pipeline): for CIFAR,
    RandomCrop(32, padding=4) (zero padding, so padded pixels become -mean/std after normalising),
    RandomHorizontalFlip(0.5), Normalize and Cutout(16) on the normalised tensor; MNIST-type data are not
    augmented (the authors use ToTensor only). ``crop-flip`` (fedlt's, for Fashion-MNIST): RandomCrop(28,
    padding=2) and RandomHorizontalFlip(0.5), then ToTensor; on CIFAR it is the authors' pipeline.
    Crop and flip are one gather with per-sample index arithmetic; Cutout is one broadcast mask.
    """
    _check(images_uint8, dataset)
    check_augment_policy(policy, dataset)
    if dataset in _GRAYSCALE:
        if policy == CROP_FLIP:
            cropped, _, _ = _crop_flip(images_uint8, GRAYSCALE_CROP_PADDING, generator)
            return to_float(cropped, dataset)
        return to_float(images_uint8, dataset)

    batch, _, height, width = images_uint8.shape
    cropped, rows_out, cols_out = _crop_flip(images_uint8, CROP_PADDING, generator)
    centre_y = _randint(height, batch, generator).to(images_uint8.device)
    centre_x = _randint(width, batch, generator).to(images_uint8.device)
    images = to_float(cropped, dataset)

    half = CUTOUT_SIZE // 2
    in_rows = (rows_out >= (centre_y - half)[:, None]) & (rows_out < (centre_y + half)[:, None])
    in_cols = (cols_out >= (centre_x - half)[:, None]) & (cols_out < (centre_x + half)[:, None])
    hole = in_rows[:, :, None] & in_cols[:, None, :]  # (N, H, W)
    return images.masked_fill_(hole[:, None], 0.0)
