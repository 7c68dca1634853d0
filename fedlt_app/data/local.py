"""A SuperNode's own training data, read from local files.

In deployment a node may train on what it actually holds (a hospital's
scans, a phone's photos) instead of a partition of a public data set. It
says so in its node config::

    flower-supernode ... --node-config "partition-id=3 num-partitions=10 local-data='/data/fedlt'"

The directory holds one file, ``train.npz`` (``numpy.savez`` /
``numpy.savez_compressed``), with two arrays:

- ``images``: ``uint8``, shape ``(N, H, W)`` (one channel) or ``(N, C, H, W)``
  (channels first), pixel values 0..255 as in the published data set;
- ``labels``: any integer dtype, shape ``(N,)``, values in ``0..num_classes-1``.

Other arrays in the file are ignored. The images must have the shape of the
run's ``dataset`` (the server builds the model and evaluates on that data
set's balanced test split) and the labels its label space: see
:data:`DATASET_SPECS`. ``partition-id`` / ``num-partitions`` are still needed:
the server uses them to discover the federation and draw seeded cohorts.

``python -m fedlt_app.data.local export`` writes such a directory from a
partition of the run's long-tailed data set (for rehearsals and tests).
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.common.logger import log

from .federated import FederatedData
from .image_dataset import ImageDataset

LOCAL_DATA_KEY = "local-data"  # the node-config key naming the directory
TRAIN_FILE = "train.npz"


class LocalDataError(ValueError):
    """A node's local data directory cannot be used; the message says why."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a node's images and labels must look like to join a run on a data set."""

    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)


# Kept in step with the loaders in sources.py / femnist.py (tests compare them
# where the data set is installed), so that a node with local files does not
# need the public data set just to learn its shape.
DATASET_SPECS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(10, (1, 28, 28)),
    "fmnist": DatasetSpec(10, (1, 28, 28)),
    "cifar10": DatasetSpec(10, (3, 32, 32)),
    "cifar100": DatasetSpec(100, (3, 32, 32)),
    "femnist": DatasetSpec(62, (1, 28, 28)),
}


def dataset_spec(dataset: str) -> DatasetSpec:
    key = str(dataset).strip().lower()
    if key not in DATASET_SPECS:
        raise ValueError(f"dataset: unknown data set {dataset!r}; allowed values are {', '.join(DATASET_SPECS)}")
    return DATASET_SPECS[key]


def load_local_client_data(
    path: str | os.PathLike[str], dataset: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``<path>/train.npz``: (uint8 images ``(N, C, H, W)``, int64 labels ``(N,)``).

    With ``dataset``, the images must have that data set's shape and the
    labels must lie in its label space. Every problem raises
    :class:`LocalDataError` naming the file and what was expected.
    """
    directory = Path(path).expanduser()
    where = f"node config {LOCAL_DATA_KEY}={str(path)!r}"
    if not directory.is_dir():
        raise LocalDataError(f"{where}: no such directory (a relative path is taken from the SuperNode's "
                             f"working directory {os.getcwd()!r}; give an absolute one)")
    file = directory / TRAIN_FILE
    if not file.is_file():
        raise LocalDataError(f"{where}: {file} is missing; the directory must hold {TRAIN_FILE} with arrays "
                             "'images' (uint8, (N,H,W) or (N,C,H,W)) and 'labels' (int, (N,))")
    try:
        with np.load(file, allow_pickle=False) as archive:
            missing = [name for name in ("images", "labels") if name not in archive.files]
            if missing:
                raise LocalDataError(f"{file}: array(s) {', '.join(missing)} missing (found: "
                                     f"{', '.join(archive.files) or 'none'})")
            images = archive["images"]
            labels = archive["labels"]
    except LocalDataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise LocalDataError(f"{file}: not a readable .npz file of plain arrays ({err})") from err

    if images.dtype != np.uint8:
        raise LocalDataError(f"{file}: 'images' must be uint8 (pixel values 0..255), found {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise LocalDataError(f"{file}: 'images' must have shape (N, H, W) or (N, C, H, W), found {images.shape}")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise LocalDataError(f"{file}: 'labels' must be integers, found {labels.dtype}")
    if labels.ndim != 1:
        raise LocalDataError(f"{file}: 'labels' must have shape (N,), found {labels.shape}")
    if len(labels) != len(images):
        raise LocalDataError(f"{file}: {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise LocalDataError(f"{file}: holds no samples")
    if labels.min() < 0:
        raise LocalDataError(f"{file}: negative label {int(labels.min())}")

    if dataset is not None:
        spec = dataset_spec(dataset)
        shape = tuple(images.shape[1:])
        if shape != spec.image_shape:
            hint = ""
            if shape == (*spec.image_shape[1:], spec.image_shape[0]):
                hint = " (channels last? store them channels first: images.transpose(0, 3, 1, 2))"
            raise LocalDataError(f"{file}: images of shape {shape} do not fit the run's dataset {dataset!r}, whose "
                                 f"images are (C, H, W) = {spec.image_shape}{hint}")
        if labels.max() >= spec.num_classes:
            raise LocalDataError(f"{file}: label {int(labels.max())} is outside the run's dataset {dataset!r}, "
                                 f"whose labels are 0..{spec.num_classes - 1}")

    image_tensor = torch.from_numpy(np.ascontiguousarray(images))
    label_tensor = torch.from_numpy(labels.astype(np.int64))
    return image_tensor, label_tensor


def local_client_dataset(
    dataset: str, path: str | os.PathLike[str]
) -> tuple[FederatedData, torch.Tensor, torch.Tensor]:
    """What ``task.client_dataset`` returns for a node with local files.

    The FederatedData holds only this node's samples, as its one client, and
    an empty test split (the server evaluates); it carries the run's class
    count and image shape, which is all a client takes from it.
    """
    spec = dataset_spec(dataset)
    images, labels = load_local_client_data(path, dataset)
    log(INFO, "[fedlt] local data: %d samples from %s", len(labels), Path(path).expanduser() / TRAIN_FILE)
    everything = np.arange(len(labels), dtype=np.int64)
    everything.setflags(write=False)
    counts = np.bincount(labels.numpy(), minlength=spec.num_classes)
    holder = ImageDataset(
        name=str(dataset).strip().lower(),
        num_classes=spec.num_classes,
        train_images=images,
        train_labels=labels,
        test_images=torch.empty((0, *spec.image_shape), dtype=torch.uint8),
        test_labels=torch.empty((0,), dtype=torch.int64),
    )
    data = FederatedData(
        dataset=holder,
        train_indices=everything,
        class_counts=tuple(int(c) for c in counts),
        client_indices=(everything,),
    )
    return data, images, labels


def save_local_client_data(out_dir: str | os.PathLike[str], images: torch.Tensor, labels: torch.Tensor) -> Path:
    """Write ``<out_dir>/train.npz`` in the local-data format; refuses to overwrite."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / TRAIN_FILE
    if file.exists():
        raise FileExistsError(f"{file} exists; remove it or choose another directory")
    np.savez_compressed(
        file,
        images=images.numpy().astype(np.uint8, copy=False),
        labels=labels.numpy().astype(np.int64, copy=False),
    )
    return file


def export_partition(run_config: str, partition_id: int, num_partitions: int, out_dir: str | os.PathLike[str]) -> Path:
    """Write partition ``partition_id`` of ``num_partitions`` of the run's data set as local files.

    ``run_config`` is what ``flwr run --run-config`` takes ("k=v ..." or a
    .toml file): the same data set, long-tail profile, partition and seed
    give the samples a simulated client with that partition id trains on.
    """
    from flwr.common.config import parse_config_args

    from fedlt_app.config import resolve
    from fedlt_app.configured_data import federated_data

    cfg = resolve(parse_config_args([run_config]) if run_config.strip() else {})
    data = federated_data(cfg, num_partitions)
    images, labels = data.client_data(partition_id)
    return save_local_client_data(out_dir, images, labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedlt_app.data.local",
        description="Local client data (a directory with train.npz) for SuperNodes started with "
        f"--node-config \"... {LOCAL_DATA_KEY}='<dir>'\".",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a partition of the run's data set as a local-data directory")
    export.add_argument("out_dir", type=Path, help="directory to create (gets train.npz)")
    export.add_argument("--run-config", default="", help="the run's overrides, as for flwr run --run-config")
    export.add_argument("--partition-id", type=int, required=True)
    export.add_argument("--num-partitions", type=int, required=True)
    check = commands.add_parser("check", help="validate a local-data directory against a data set")
    check.add_argument("dir", type=Path)
    check.add_argument("--dataset", default="fmnist", help=f"one of {', '.join(DATASET_SPECS)} (default fmnist)")
    args = parser.parse_args(argv)
    from click import ClickException  # flwr's --run-config parser raises it on a malformed string

    try:
        if args.command == "export":
            if args.num_partitions < 1:
                parser.error("--num-partitions must be >= 1")
            file = export_partition(args.run_config, args.partition_id, args.num_partitions, args.out_dir)
            _, labels = load_local_client_data(file.parent)
            print(f"{file}: {len(labels)} samples, per class {np.bincount(labels.numpy()).tolist()}")
        else:
            images, labels = load_local_client_data(args.dir, args.dataset)
            print(f"{args.dir / TRAIN_FILE}: {len(labels)} images of shape {tuple(images.shape[1:])}, "
                  f"per class {np.bincount(labels.numpy()).tolist()}")
    except (ValueError, OSError, ClickException) as err:
        print(f"error: {getattr(err, 'message', err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
