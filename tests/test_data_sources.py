"""Loaders read the real on-disk formats; missing data is a clear error, never fake data."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlt_app.data import DatasetNotFoundError, load_dataset, sources

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_set(folder: Path, rng: np.random.Generator, gz: bool) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        data = _idx_bytes(array, 2051 if array.ndim == 3 else 2049)
        if gz:
            with gzip.open(folder / f"{stem}.gz", "wb") as handle:
                handle.write(data)
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["mnist", "MNIST/raw", "."])
def test_mnist_idx(tmp_path: Path, gz: bool, layout: str) -> None:
    arrays = _write_idx_set(tmp_path / layout, np.random.default_rng(0), gz)
    data = load_dataset("mnist", tmp_path)
    assert data.name == "mnist" and data.num_classes == 10
    assert data.train_images.shape == (12, 1, 28, 28) and data.test_images.shape == (5, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.train_images.is_contiguous()
    assert np.array_equal(data.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data.train_labels.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(data.test_images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(data.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_load_is_cached(tmp_path: Path) -> None:
    _write_idx_set(tmp_path / "mnist", np.random.default_rng(0), gz=False)
    assert load_dataset("mnist", tmp_path) is load_dataset("MNIST", str(tmp_path) + "/")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:-1], "size mismatch"),
        (lambda b: (2049).to_bytes(4, "big") + b[4:], "magic"),
        (lambda b: b[:3], "too short"),
    ],
)
def test_corrupt_idx_names_the_file(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    _write_idx_set(tmp_path / "mnist", np.random.default_rng(0), gz=False)
    target = tmp_path / "mnist" / "train-images-idx3-ubyte"
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("mnist", tmp_path)
    assert str(target) in str(info.value)


def _cifar_batch(rng: np.random.Generator, n: int, num_classes: int, label_key: bytes) -> dict[bytes, object]:
    return {
        b"batch_label": b"synthetic",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, num_classes, n).tolist(),  # real files store a list of ints
        b"filenames": [b"x.png"] * n,
    }


def _dump(path: Path, batch: dict[bytes, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        pickle.dump(batch, handle, protocol=2)


def test_cifar10_pickles(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    train = [_cifar_batch(rng, 4, 10, b"labels") for _ in range(5)]
    for i, batch in enumerate(train, start=1):
        _dump(folder / f"data_batch_{i}", batch)
    test = _cifar_batch(rng, 3, 10, b"labels")
    _dump(folder / "test_batch", test)

    data = load_dataset("cifar10", tmp_path)
    assert data.num_classes == 10
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (3, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8 and data.test_labels.dtype == torch.int64
    expected = np.concatenate([b[b"data"] for b in train]).reshape(20, 3, 32, 32)
    assert np.array_equal(data.train_images.numpy(), expected)
    # Row-major 3072 = 1024 red, then green, then blue values of a 32x32 image.
    assert data.train_images[0, 1, 0, 0] == train[0][b"data"][0, 1024]
    assert data.train_labels.tolist() == [label for b in train for label in b[b"labels"]]
    assert data.test_labels.tolist() == test[b"labels"]


def test_cifar100_pickles(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    train = _cifar_batch(rng, 7, 100, b"fine_labels")
    train[b"coarse_labels"] = [0] * 7
    test = _cifar_batch(rng, 2, 100, b"fine_labels")
    _dump(tmp_path / "cifar-100-python" / "train", train)
    _dump(tmp_path / "cifar-100-python" / "test", test)

    data = load_dataset("cifar100", tmp_path)
    assert data.num_classes == 100
    assert data.train_images.shape == (7, 3, 32, 32) and data.test_images.shape == (2, 3, 32, 32)
    assert np.array_equal(data.train_images.numpy().reshape(7, -1), train[b"data"])
    assert data.train_labels.tolist() == train[b"fine_labels"]
    assert data.test_labels.tolist() == test[b"fine_labels"]


def test_missing_mnist_lists_paths_and_remedy(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    for folder in (tmp_path / "mnist", tmp_path / "MNIST" / "raw", tmp_path):
        assert str(folder) in message
    assert "train-images-idx3-ubyte" in message and "download=True" in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_fmnist_mentions_apt_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fmnist", tmp_path / "data")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "data" / "fashion-mnist") in message
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in message
    assert str(tmp_path / "nowhere") in message


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_cifar_tries_torchvision_then_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    attempts: list[tuple[str, Path]] = []

    def offline(dataset: str, root: Path) -> None:
        attempts.append((dataset, root))
        raise OSError("no network")

    monkeypatch.setattr(sources, "_torchvision_download", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, tmp_path)
    assert attempts == [(name, tmp_path.resolve())]
    message = str(info.value)
    assert "cifar-10-batches-py" in message if name == "cifar10" else "cifar-100-python" in message
    assert "https://www.cs.toronto.edu/~kriz/" in message
    assert "no network" in message


def test_missing_cifar_without_data_dir() -> None:
    with pytest.raises(DatasetNotFoundError, match="no data-dir"):
        load_dataset("cifar10", None)


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match="dataset"):
        load_dataset("svhn", None)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt package dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    data = load_dataset("fmnist", None)
    assert data.num_classes == 10
    assert data.train_images.shape == (60000, 1, 28, 28)
    assert data.test_images.shape == (10000, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert np.bincount(data.train_labels.numpy()).tolist() == [6000] * 10
    assert np.bincount(data.test_labels.numpy()).tolist() == [1000] * 10
    assert 0 < float(data.train_images.float().mean()) < 255
