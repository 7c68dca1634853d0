"""A SuperNode's own data files (node config ``local-data``): format, checks, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlt_app.config import resolve
from fedlt_app.configured_data import federated_data
from fedlt_app.data import DatasetNotFoundError, load_dataset
from fedlt_app.data.local import (
    DATASET_SPECS,
    LOCAL_DATA_KEY,
    TRAIN_FILE,
    LocalDataError,
    export_partition,
    load_local_client_data,
    local_client_dataset,
    main,
)
from fedlt_app.task import client_dataset, method_model

SMALL = "samples-per-class=40 imbalance-ratio=10.0"


def write(directory: Path, **arrays: np.ndarray) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / TRAIN_FILE, **arrays)
    return directory


def images_of(n: int, shape: tuple[int, ...] = (1, 28, 28)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def test_reads_channels_first_and_single_channel_images(tmp_path: Path) -> None:
    labels = np.array([0, 3, 9, 3], dtype=np.int32)
    x4 = images_of(4)
    images, got = load_local_client_data(write(tmp_path / "a", images=x4, labels=labels), "fmnist")
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 28, 28)
    assert got.dtype == torch.int64 and got.tolist() == [0, 3, 9, 3]
    assert torch.equal(images, torch.from_numpy(x4))
    images3, _ = load_local_client_data(write(tmp_path / "b", images=x4[:, 0], labels=labels), "fmnist")
    assert torch.equal(images3, images)  # (N, H, W) is one channel
    cifar, _ = load_local_client_data(write(tmp_path / "c", images=images_of(4, (3, 32, 32)), labels=labels), "cifar10")
    assert cifar.shape == (4, 3, 32, 32)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": images_of(3).astype(np.float32), "labels": np.arange(3)}, "'images' must be uint8"),
        ({"images": images_of(3)[:, :, :, :, None], "labels": np.arange(3)}, "(N, H, W) or (N, C, H, W)"),
        ({"images": images_of(3), "labels": np.arange(3, dtype=np.float64)}, "'labels' must be integers"),
        ({"images": images_of(3), "labels": np.ones(3, dtype=bool)}, "'labels' must be integers"),
        ({"images": images_of(3), "labels": np.zeros((3, 1), dtype=np.int64)}, "shape (N,)"),
        ({"images": images_of(3), "labels": np.arange(4)}, "3 images but 4 labels"),
        ({"images": images_of(0), "labels": np.arange(0)}, "no samples"),
        ({"images": images_of(3), "labels": np.array([0, -1, 2])}, "negative label -1"),
        ({"images": images_of(3), "labels": np.array([0, 10, 2])}, "label 10 is outside"),
        ({"images": images_of(3, (3, 32, 32)), "labels": np.arange(3)}, "do not fit the run's dataset 'fmnist'"),
        ({"images": images_of(3)}, "labels missing"),
        ({"labels": np.arange(3)}, "images missing"),
    ],
)
def test_refuses_what_does_not_fit(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    directory = write(tmp_path / "d", **arrays)
    with pytest.raises(LocalDataError) as err:
        load_local_client_data(directory, "fmnist")
    assert message in str(err.value)
    assert str(directory / TRAIN_FILE) in str(err.value)


def test_channels_last_gets_a_hint(tmp_path: Path) -> None:
    directory = write(tmp_path / "d", images=images_of(2, (32, 32, 3)), labels=np.arange(2))
    with pytest.raises(LocalDataError, match="channels last"):
        load_local_client_data(directory, "cifar10")


def test_label_space_is_the_run_data_set(tmp_path: Path) -> None:
    directory = write(tmp_path / "d", images=images_of(2, (3, 32, 32)), labels=np.array([0, 99]))
    assert load_local_client_data(directory, "cifar100")[1].tolist() == [0, 99]
    with pytest.raises(LocalDataError, match=r"labels are 0\.\.9"):
        load_local_client_data(directory, "cifar10")


def test_missing_directory_file_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(LocalDataError, match="no such directory"):
        load_local_client_data(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LocalDataError, match=f"{TRAIN_FILE} is missing"):
        load_local_client_data(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / TRAIN_FILE).write_bytes(b"not a zip")
    with pytest.raises(LocalDataError, match="not a readable .npz"):
        load_local_client_data(tmp_path / "bad")
    pickled = write(tmp_path / "pickled", images=images_of(2), labels=np.array([0, 1], dtype=object))
    with pytest.raises(LocalDataError, match="not a readable .npz"):  # no pickles from disk
        load_local_client_data(pickled)


def test_node_with_local_data_trains_on_its_files(tmp_path: Path) -> None:
    cfg = resolve({"samples-per-class": 40, "imbalance-ratio": 10.0})
    labels = np.array([1, 1, 2, 7])
    directory = write(tmp_path / "mine", images=images_of(4), labels=labels)
    node = {"partition-id": 1, "num-partitions": 3, LOCAL_DATA_KEY: str(directory)}
    data, images, got = client_dataset(cfg, node)
    assert got.tolist() == labels.tolist() and images.shape == (4, 1, 28, 28)
    assert data.num_classes == 10 and data.class_counts[1] == 2 and sum(data.class_counts) == 4
    model = method_model(cfg, data)  # the client builds the run's network from it
    assert model(images[:2].float()).shape == (2, 10)
    # partition-id / num-partitions are still required (discovery, cohorts, seeds)
    with pytest.raises(ValueError, match="partition-id"):
        client_dataset(cfg, {LOCAL_DATA_KEY: str(directory)})
    with pytest.raises(LocalDataError, match="no such directory"):
        client_dataset(cfg, {**node, LOCAL_DATA_KEY: str(tmp_path / "typo")})


def test_local_data_needs_no_public_data_set(tmp_path: Path) -> None:
    """A hospital's node has only its own files: CIFAR-100 need not be installed."""
    directory = write(tmp_path / "d", images=images_of(3, (3, 32, 32)), labels=np.array([5, 50, 95]))
    data, images, labels = local_client_dataset("cifar100", directory)
    assert data.num_classes == 100 and tuple(data.dataset.train_images.shape[1:]) == (3, 32, 32)
    assert len(data.dataset.test_labels) == 0 and labels.tolist() == [5, 50, 95]


def test_export_gives_exactly_the_simulated_partition(tmp_path: Path) -> None:
    file = export_partition(SMALL, 1, 3, tmp_path / "node-1")
    assert file == tmp_path / "node-1" / TRAIN_FILE
    cfg = resolve({"samples-per-class": 40, "imbalance-ratio": 10.0})
    expected_images, expected_labels = federated_data(cfg, 3).client_data(1)
    _, images, labels = client_dataset(
        cfg, {"partition-id": 1, "num-partitions": 3, LOCAL_DATA_KEY: str(tmp_path / "node-1")}
    )
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    with pytest.raises(FileExistsError):
        export_partition(SMALL, 1, 3, tmp_path / "node-1")


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "n0"
    assert main(["export", "--run-config", SMALL, "--partition-id", "0", "--num-partitions", "2", str(out)]) == 0
    assert "samples" in capsys.readouterr().out
    assert main(["check", str(out), "--dataset", "fmnist"]) == 0
    assert main(["check", str(out), "--dataset", "cifar10"]) == 1
    assert "do not fit" in capsys.readouterr().err
    assert main(["export", "--run-config", SMALL, "--partition-id", "0", "--num-partitions", "2", str(out)]) == 1
    assert main(["export", "--run-config", "dirichlet-alpha=-1.0", "--partition-id", "0", "--num-partitions", "2",
                 str(tmp_path / "bad")]) == 1
    assert "dirichlet-alpha" in capsys.readouterr().err
    assert main(["export", "--run-config", "seed=x y", "--partition-id", "0", "--num-partitions", "2",
                 str(tmp_path / "bad")]) == 1


@pytest.mark.parametrize("name", sorted(DATASET_SPECS))
def test_specs_match_the_loaders(name: str) -> None:
    try:
        data = load_dataset(name, None)
    except DatasetNotFoundError:
        pytest.skip(f"{name} is not installed here")
    spec = DATASET_SPECS[name]
    assert data.num_classes == spec.num_classes
    assert tuple(data.train_images.shape[1:]) == spec.image_shape
