"""Read the raw image data sets from disk in their published formats.

Only the on-disk formats the data sets are distributed in are read (MNIST IDX
files, the CIFAR "python version" pickles, and FEMNIST's LEAF JSON / TFF HDF5
files, see :mod:`.femnist`), so the loader works offline and
never has to fall back to anything: if the files are not found the caller gets
a :class:`DatasetNotFoundError` that says where we looked and how to get them.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .femnist import load_femnist
from .image_dataset import DatasetNotFoundError, ImageDataset

DATASETS = ("mnist", "fmnist", "cifar10", "cifar100", "femnist")

SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST = "test_batch"
_CIFAR100_DIR = "cifar-100-python"


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None) -> ImageDataset:
    """Load one of :data:`DATASETS`, decoding it at most once per process.

    ``data_dir`` may be None or "" when no data directory is configured; then
    only system-wide locations (Fashion-MNIST's apt package, FEMNIST's
    Hugging Face cache) are searched.
    """
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ValueError(f"dataset: unknown data set {name!r}; allowed values are {', '.join(DATASETS)}")
    resolved = str(Path(data_dir).expanduser().resolve()) if data_dir else ""
    return _load_cached(key, resolved)


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: str) -> ImageDataset:
    """Decode once per (name, directory): Ray workers host many virtual clients."""
    root = Path(data_dir) if data_dir else None
    if name in ("mnist", "fmnist"):
        return _load_idx_dataset(name, root)
    if name == "femnist":
        return load_femnist(root)
    return _load_cifar_dataset(name, root)


# --------------------------------------------------------------------------- IDX


def _idx_candidate_dirs(name: str, root: Path | None) -> list[Path]:
    """Directories in the order the layouts are commonly found in."""
    dirs: list[Path] = []
    if root is not None:
        if name == "fmnist":
            dirs += [root / "fashion-mnist", root / "FashionMNIST" / "raw", root]
        else:
            dirs += [root / "mnist", root / "MNIST" / "raw", root]
    if name == "fmnist":
        dirs.append(SYSTEM_FASHION_MNIST_DIR)
    return dirs


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as handle:
                return handle.read()
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip file ({err})") from err
    return path.read_bytes()


def _parse_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse an IDX file, checking the header so a truncated download is caught here."""
    raw = _read_bytes(path)
    if len(raw) < 8:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[0:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: bad IDX magic number {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX size mismatch, header says shape {shape} ({expected} bytes) but the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _load_idx_split(paths: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = _parse_idx(paths[f"{split}_images"], _IDX_IMAGES_MAGIC)
    labels = _parse_idx(paths[f"{split}_labels"], _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{paths[f'{split}_images']}: {images.shape[0]} images but "
            f"{paths[f'{split}_labels']} has {labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{paths[f'{split}_labels']}: label {labels.max()} outside 0..9")
    image_tensor = torch.from_numpy(images.copy()).unsqueeze(1).contiguous()
    return image_tensor, torch.from_numpy(labels.astype(np.int64))


def _load_idx_dataset(name: str, root: Path | None) -> ImageDataset:
    searched = _idx_candidate_dirs(name, root)
    for directory in searched:
        found = {key: _find_idx_file(directory, stem) for key, stem in _IDX_FILES.items()}
        if all(path is not None for path in found.values()):
            paths = {key: path for key, path in found.items() if path is not None}
            train_x, train_y = _load_idx_split(paths, "train")
            test_x, test_y = _load_idx_split(paths, "test")
            return ImageDataset(name, 10, train_x, train_y, test_x, test_y)
    raise DatasetNotFoundError(_not_found_message(name, searched))


# ------------------------------------------------------------------------- CIFAR


def _unpickle(path: Path) -> dict[bytes, object]:
    # The CIFAR archives are pickles of dicts written by Python 2; "bytes"
    # keeps their keys as b"data" etc. regardless of the writer.
    with path.open("rb") as handle:
        try:
            batch = pickle.load(handle, encoding="bytes")
        except Exception as err:  # any unpickling failure means a bad file
            raise ValueError(f"{path}: not a readable CIFAR pickle ({err})") from err
    if not isinstance(batch, dict):  # a bad file, not a caller's type error
        raise ValueError(f"{path}: expected a dict, found {type(batch).__name__}")
    return {(k.encode() if isinstance(k, str) else k): v for k, v in batch.items()}


def _read_cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if b"data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: missing key b'data' or {label_key!r} (found {sorted(batch)})")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: data must be uint8 of shape (N, 3072), found {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels outside 0..{num_classes - 1}")
    return data, labels


def _cifar_layout(name: str, base: Path) -> tuple[list[Path], list[Path], bytes, int]:
    if name == "cifar10":
        folder = base / _CIFAR10_DIR
        return (
            [folder / f for f in _CIFAR10_TRAIN],
            [folder / _CIFAR10_TEST],
            b"labels",
            10,
        )
    folder = base / _CIFAR100_DIR
    return [folder / "train"], [folder / "test"], b"fine_labels", 100


def _try_cifar_from(name: str, base: Path) -> ImageDataset | None:
    train_files, test_files, label_key, num_classes = _cifar_layout(name, base)
    if not all(path.is_file() for path in train_files + test_files):
        return None

    def stack(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_cifar_batch(path, label_key, num_classes) for path in files]
        data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels)

    train_x, train_y = stack(train_files)
    test_x, test_y = stack(test_files)
    return ImageDataset(name, num_classes, train_x, train_y, test_x, test_y)


def _torchvision_download(name: str, root: Path) -> None:
    """Let torchvision fetch the same pickle tarball where a network exists."""
    from torchvision import datasets  # imported lazily: only this path needs it

    factory: Callable[..., object] = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    factory(root=str(root), train=True, download=True)
    factory(root=str(root), train=False, download=True)


def _load_cifar_dataset(name: str, root: Path | None) -> ImageDataset:
    searched: list[Path] = []
    if root is not None:
        train_files, _, _, _ = _cifar_layout(name, root)
        searched.append(train_files[0].parent)
        dataset = _try_cifar_from(name, root)
        if dataset is not None:
            return dataset
        download_error: str | None = None
        try:
            _torchvision_download(name, root)
        except Exception as err:  # noqa: BLE001 - any failure means "not available here"
            download_error = f"{type(err).__name__}: {err}"
        dataset = _try_cifar_from(name, root)
        if dataset is not None:
            return dataset
        message = _not_found_message(name, searched)
        if download_error:
            message += f"\nThe torchvision download into {root} failed: {download_error}"
        raise DatasetNotFoundError(message)
    raise DatasetNotFoundError(_not_found_message(name, searched))


# ------------------------------------------------------------------------ errors


def _not_found_message(name: str, searched: list[Path]) -> str:
    looked = "\n".join(f"  - {path}" for path in searched) or "  (nothing: no data-dir was given)"
    how = {
        "fmnist": (
            "install the system package (`apt-get install dataset-fashion-mnist`, "
            f"which puts the files in {SYSTEM_FASHION_MNIST_DIR}), or put the four IDX files "
            "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte; raw or .gz) in <data-dir>/fashion-mnist, or run "
            "torchvision.datasets.FashionMNIST(root=<data-dir>, download=True) where a network exists"
        ),
        "mnist": (
            "put the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; raw or .gz) in <data-dir>/mnist, "
            "or run torchvision.datasets.MNIST(root=<data-dir>, download=True) where a network exists"
        ),
        "cifar10": (
            "download the CIFAR-10 python version (cifar-10-python.tar.gz) from "
            "https://www.cs.toronto.edu/~kriz/cifar.html and extract it under <data-dir> "
            f"(giving <data-dir>/{_CIFAR10_DIR}), or let torchvision.datasets.CIFAR10(root=<data-dir>, "
            "download=True) fetch it where a network exists"
        ),
        "cifar100": (
            "download the CIFAR-100 python version (cifar-100-python.tar.gz) from "
            "https://www.cs.toronto.edu/~kriz/cifar.html and extract it under <data-dir> "
            f"(giving <data-dir>/{_CIFAR100_DIR}), or let torchvision.datasets.CIFAR100(root=<data-dir>, "
            "download=True) fetch it where a network exists"
        ),
    }[name]
    return f"Data set {name!r} not found. Looked in:\n{looked}\nTo get it: {how}."
