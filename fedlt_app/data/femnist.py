"""FEMNIST: 62-class handwritten characters, with the writers as natural clients.

Read from the files users actually have, in this order (the first complete
layout wins):

1. LEAF JSON (``leaf/data/femnist/data/{train,test}`` after ``preprocess.sh``):
   ``<data-dir>/femnist/{train,test}/*.json`` or ``<data-dir>/femnist/data/{train,test}/*.json``,
   each ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [[784 floats]], "y": [ints]}}}``.
2. TensorFlow Federated's HDF5 (``fed_emnist.tar.bz2``, 3,400 writers, the
   version the paper's 3,400 writers and the authors' FedML loader come from):
   ``<data-dir>/femnist/fed_emnist_train.h5`` and ``fed_emnist_test.h5`` with
   ``examples/<writer>/pixels`` (n, 28, 28) float32 and ``examples/<writer>/label`` (n,).
   Needs ``h5py``, imported only here.
3. Flower Datasets' ``flwrlabs/femnist`` on the Hugging Face hub, through
   ``datasets`` (its cache, or a download where a network exists;
   ``HF_HUB_OFFLINE=1`` is honoured by ``datasets`` itself). It has a single
   split, so every 10th sample of each writer (positions 9, 19, ... in the
   hub's order) becomes that writer's test sample.

Nothing is ever made up: without any of these, :class:`DatasetNotFoundError`
lists every place searched and how to get the data.

Pixels are stored like the other data sets, uint8 (N, 1, 28, 28) with
``round(x * 255)``. Their polarity is kept as the files have it: in LEAF and
TFF the background is white (x close to 1.0, so 255) and the ink dark, the
inverse of MNIST. The authors' loader feeds TFF's pixels unchanged, and the
CNN is trained from scratch, so no inversion is applied.

Labels are LEAF/TFF's 0..61: digits 0-9, upper case A-Z (10-35), lower case
a-z (36-61). ``train_writers[i]`` is the index of sample i's writer in the
sorted list of training writer names. The test set is pooled over writers and
balanced: the first ``test_per_class`` (200, as the paper) test samples of
every class in file order (files by name, writers in the file's order).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from .image_dataset import DatasetNotFoundError, ImageDataset

NUM_CLASSES = 62
IMAGE_SIZE = 28
TEST_PER_CLASS = 200
HF_REPO = "flwrlabs/femnist"
H5_FILES = ("fed_emnist_train.h5", "fed_emnist_test.h5")
TFF_URL = "https://storage.googleapis.com/tff-datasets-public/fed_emnist.tar.bz2"

# One split's decoded content: uint8 (n, 28, 28) images, int64 labels, writer name per sample.
Split = tuple[np.ndarray, np.ndarray, list[str]]


def load_femnist(root: Path | None, test_per_class: int = TEST_PER_CLASS) -> ImageDataset:
    """Find and decode FEMNIST under ``root`` (``<data-dir>``), or fail clearly.

    ``test_per_class`` caps the balanced test set (the paper: 200 per class).
    """
    if test_per_class < 1:
        raise ValueError(f"test_per_class must be >= 1, got {test_per_class}")
    searched: list[str] = []
    notes: list[str] = []
    if root is not None:
        base = root / "femnist"
        for folder in (base, base / "data"):
            train_dir, test_dir = folder / "train", folder / "test"
            searched.append(f"{train_dir}/*.json and {test_dir}/*.json (LEAF)")
            train_files, test_files = leaf_json_files(train_dir), leaf_json_files(test_dir)
            if train_files and test_files:
                return build_dataset(read_leaf_json(train_files), read_leaf_json(test_files), test_per_class)
            if train_files or test_files:
                notes.append(f"{folder}: found JSON files in only one of train/ and test/")
        h5_paths = [base / name for name in H5_FILES]
        searched.append(" and ".join(str(p) for p in h5_paths) + " (TensorFlow Federated)")
        if all(p.is_file() for p in h5_paths):
            return build_dataset(read_tff_h5(h5_paths[0]), read_tff_h5(h5_paths[1]), test_per_class)
        if any(p.is_file() for p in h5_paths):
            notes.append(f"{base}: found only one of {' and '.join(H5_FILES)}")
    searched.append(f"Hugging Face hub {HF_REPO!r} via the `datasets` cache or download")
    try:
        train, test = load_hub_splits()
    except Exception as err:  # noqa: BLE001 - any failure means "not available here"
        notes.append(f"{HF_REPO}: {type(err).__name__}: {err}")
    else:
        return build_dataset(train, test, test_per_class)
    raise DatasetNotFoundError(not_found_message(searched, notes))


def build_dataset(train: Split, test: Split, test_per_class: int = TEST_PER_CLASS) -> ImageDataset:
    """Assemble the ImageDataset: writer indices for training, the balanced test set."""
    train_x, train_y, train_names = train
    test_x, test_y, _ = test
    if train_y.size == 0 or test_y.size == 0:
        raise ValueError(f"FEMNIST: empty split ({train_y.size} training, {test_y.size} test samples)")
    writers = sorted(set(train_names))
    index = {name: i for i, name in enumerate(writers)}
    train_writers = np.fromiter((index[n] for n in train_names), dtype=np.int64, count=len(train_names))
    keep = balanced_indices(test_y, test_per_class)
    return ImageDataset(
        name="femnist",
        num_classes=NUM_CLASSES,
        train_images=_to_tensor(train_x),
        train_labels=torch.from_numpy(train_y.astype(np.int64)),
        test_images=_to_tensor(test_x[keep]),
        test_labels=torch.from_numpy(test_y[keep].astype(np.int64)),
        train_writers=torch.from_numpy(train_writers),
    )


def balanced_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Sorted positions of the first ``per_class`` samples of every class."""
    labels = np.asarray(labels)
    keep = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)).astype(np.int64)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).contiguous()


def to_uint8(pixels: np.ndarray, where: str) -> np.ndarray:
    """Floats in [0, 1] to uint8 round(x * 255), refusing values outside that range."""
    x = np.asarray(pixels, dtype=np.float32)
    if x.size and (not np.all(np.isfinite(x)) or x.min() < -1e-6 or x.max() > 1.0 + 1e-6):
        raise ValueError(f"{where}: pixel values must lie in [0, 1], found {x.min()}..{x.max()}")
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def check_labels(labels: object, where: str) -> np.ndarray:
    """Class indices as int64, refusing non-integers and values outside 0..61."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{where}: labels must be a flat list, found shape {y.shape}")
    integral = np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))
    if y.size and not integral:
        raise ValueError(f"{where}: labels must be integers, found {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise ValueError(f"{where}: labels must lie in 0..{NUM_CLASSES - 1}, found {y.min()}..{y.max()}")
    return y.astype(np.int64)


def _concat(images: list[np.ndarray], labels: list[np.ndarray], names: list[str]) -> Split:
    if not images:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8), np.zeros(0, np.int64), []
    return np.concatenate(images), np.concatenate(labels), names


# ------------------------------------------------------------------ LEAF JSON


def leaf_json_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.json") if p.is_file()) if directory.is_dir() else []


def read_leaf_json(files: Sequence[Path]) -> Split:
    """Decode LEAF JSON files in the given order; within a file, writers in its "users" order."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    names: list[str] = []
    for path in files:
        try:
            with path.open("r", encoding="utf-8") as handle:
                content = json.load(handle)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable LEAF JSON file ({err})") from err
        if not isinstance(content, dict) or "users" not in content or "user_data" not in content:
            raise ValueError(f"{path}: expected a LEAF JSON object with 'users' and 'user_data'")
        users, user_data = content["users"], content["user_data"]
        counts = content.get("num_samples")
        if counts is not None and len(counts) != len(users):
            raise ValueError(f"{path}: {len(users)} users but {len(counts)} num_samples entries")
        for position, user in enumerate(users):
            where = f"{path}, user {user!r}"
            if user not in user_data:
                raise ValueError(f"{where}: listed in 'users' but missing from 'user_data'")
            record = user_data[user]
            y = check_labels(record.get("y", []), where)
            try:
                x = np.asarray(record.get("x", []), dtype=np.float32)
            except (TypeError, ValueError) as err:  # ragged rows
                raise ValueError(f"{where}: x must be {y.size} rows of 784 floats ({err})") from err
            if x.shape != (y.size, IMAGE_SIZE * IMAGE_SIZE) and not (x.size == 0 and y.size == 0):
                raise ValueError(f"{where}: expected x of shape ({y.size}, 784), found {x.shape}")
            x = to_uint8(x.reshape(y.size, IMAGE_SIZE, IMAGE_SIZE), where)
            if counts is not None and int(counts[position]) != y.size:
                raise ValueError(f"{where}: num_samples says {counts[position]} but it has {y.size} samples")
            images.append(x)
            labels.append(y)
            names.extend([str(user)] * y.size)
        del content  # the parsed JSON is many times the size of the decoded arrays
    return _concat(images, labels, names)


# ------------------------------------------------------------------- TFF HDF5


def _import_h5py() -> ModuleType:
    try:
        import h5py
    except ImportError as err:
        raise ModuleNotFoundError(
            "FEMNIST: found TensorFlow Federated's fed_emnist_*.h5 files, but reading them needs h5py: "
            "run `pip install h5py` (or use the LEAF JSON files instead)"
        ) from err
    return h5py


def read_tff_h5(path: Path) -> Split:
    """Decode one TFF fed_emnist file; writers in name order, samples in file order."""
    h5py = _import_h5py()
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    names: list[str] = []
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from err
    with handle:
        if "examples" not in handle:
            raise ValueError(f"{path}: no 'examples' group (expected examples/<writer>/{{pixels,label}})")
        examples = handle["examples"]
        for writer in sorted(examples.keys()):
            where = f"{path}, writer {writer!r}"
            group = examples[writer]
            if "pixels" not in group or "label" not in group:
                raise ValueError(f"{where}: expected datasets 'pixels' and 'label'")
            x = to_uint8(group["pixels"][()], where)
            y = check_labels(np.asarray(group["label"][()]).reshape(-1), where)
            if x.shape != (y.size, IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(f"{where}: expected pixels of shape ({y.size}, 28, 28), found {x.shape}")
            images.append(x)
            labels.append(y)
            names.extend([writer] * y.size)
    return _concat(images, labels, names)


# ------------------------------------------------------------ Hugging Face hub


def load_hub_splits() -> tuple[Split, Split]:
    """flwrlabs/femnist through `datasets` (cache first; HF_HUB_OFFLINE is respected by it)."""
    import datasets  # heavy; only this path needs it

    hub = datasets.load_dataset(HF_REPO, split="train")
    return split_hub_table(hub)


def split_hub_table(hub: object, batch_size: int = 20_000) -> tuple[Split, Split]:
    """Decode a `datasets.Dataset` with columns image, writer_id, character; split per writer.

    The hub copy has one split, so each writer's samples at positions 9, 19,
    29, ... (its every 10th, in the hub's order) form the test split: about
    LEAF's 90/10 sample split, deterministic, and every writer keeps most of
    its data for training.
    """
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    names: list[str] = []
    table = hub.with_format("numpy", columns=["image", "writer_id", "character"])  # type: ignore[attr-defined]
    for batch in table.iter(batch_size=batch_size):
        x = np.asarray(batch["image"])
        if x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or x.dtype != np.uint8:
            raise ValueError(f"{HF_REPO}: expected 28x28 grayscale uint8 images, found {x.dtype} {x.shape}")
        images.append(x)
        labels.append(check_labels(np.asarray(batch["character"]), HF_REPO))
        names.extend(str(w) for w in batch["writer_id"])
    x_all, y_all, _ = _concat(images, labels, names)
    writer_codes = np.unique(np.asarray(names), return_inverse=True)[1].reshape(-1)
    # Position of each sample within its writer's samples, in hub order.
    order = np.argsort(writer_codes, kind="stable")
    starts = np.searchsorted(writer_codes[order], writer_codes[order])
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - starts
    is_test = rank % 10 == 9
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    return (
        (x_all[train_idx], y_all[train_idx], [names[i] for i in train_idx]),
        (x_all[test_idx], y_all[test_idx], [names[i] for i in test_idx]),
    )


# ---------------------------------------------------------------------- errors


def not_found_message(searched: Sequence[str], notes: Sequence[str] = ()) -> str:
    looked = "\n".join(f"  - {place}" for place in searched)
    if not any("LEAF" in place for place in searched):
        looked += "\n  (no data-dir was given, so no local files were searched)"
    found = "".join(f"\n  note: {note}" for note in notes)
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0") else ""
    return (
        f"Data set 'femnist' not found. Looked in:\n{looked}{found}\n"
        "To get it, any one of:\n"
        "  - LEAF JSON: git clone https://github.com/TalwalkarLab/leaf, then in leaf/data/femnist run "
        "`./preprocess.sh -s niid --sf 1.0 -k 0 -t sample` and copy its data/train and data/test folders "
        "to <data-dir>/femnist/train and <data-dir>/femnist/test;\n"
        f"  - TensorFlow Federated HDF5 (3,400 writers, as in the paper): download {TFF_URL}, extract "
        "fed_emnist_train.h5 and fed_emnist_test.h5 into <data-dir>/femnist/ and `pip install h5py`;\n"
        f"  - where a network exists, unset HF_HUB_OFFLINE{offline} so that Hugging Face `datasets` "
        f"downloads {HF_REPO!r} (Flower Datasets' copy) into its cache."
    )
