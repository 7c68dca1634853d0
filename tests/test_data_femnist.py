"""FEMNIST: LEAF JSON and TFF HDF5 files, writers as clients, the balanced test set.

No real FEMNIST is needed: each test writes a few writers' worth of data in
the published formats into tmp_path and reads it back through the real code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlt_app.config import ConfigError, resolve
from fedlt_app.data import (
    DatasetNotFoundError,
    FederatedData,
    femnist,
    load_dataset,
    load_federated_data,
    load_femnist,
    partition_writers,
)

try:
    import h5py
except ImportError:  # optional: only the TFF reader needs it
    h5py = None
needs_h5py = pytest.mark.skipif(h5py is None, reason="h5py not installed (needed only for TFF's .h5 files)")

# Five writers, listed out of name order; classes 0 (digit 0), 10 ('A'), 61 ('z') and 5.
WRITERS = ["f0300_12", "f0100_40", "f0500_07", "f0200_33", "f0400_21"]
SORTED = sorted(WRITERS)
TRAIN_LABELS = {
    "f0300_12": [0, 10, 10, 61],
    "f0100_40": [0, 0, 5],
    "f0500_07": [61, 61],
    "f0200_33": [10, 5, 0, 0, 0],
    "f0400_21": [5],
}
TEST_LABELS = {
    "f0300_12": [0, 10, 61],
    "f0100_40": [0, 0],
    "f0500_07": [61, 5],
    "f0200_33": [10, 10, 0],
    "f0400_21": [5, 61],
}


def _pixels(writer: str, labels: list[int], split: str) -> np.ndarray:
    """Distinct, exactly representable pixels (k/255) per sample, white (1.0) border as in LEAF."""
    seed = sum(map(ord, writer + split))
    levels = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 28, 28))
    levels[:, 0, :] = 255
    return (levels / 255.0).astype(np.float64)


def _expected(labels: dict[str, list[int]], order: list[str], split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    x = np.concatenate([_pixels(w, labels[w], split) for w in order])
    y = np.concatenate([labels[w] for w in order]).astype(np.int64)
    names = [w for w in order for _ in labels[w]]
    return np.rint(x * 255).astype(np.uint8), y, names


def write_leaf(folder: Path) -> None:
    """LEAF's layout: train/ and test/ with several JSON files, each holding some writers."""
    for split, labels in (("train", TRAIN_LABELS), ("test", TEST_LABELS)):
        (folder / split).mkdir(parents=True)
        for number, users in enumerate((WRITERS[:3], WRITERS[3:])):
            content = {
                "users": users,
                "num_samples": [len(labels[u]) for u in users],
                "user_data": {
                    u: {"x": _pixels(u, labels[u], split).reshape(-1, 784).tolist(), "y": labels[u]} for u in users
                },
            }
            name = f"all_data_{number}_niid_0_keep_0_{split}_9.json"
            (folder / split / name).write_text(json.dumps(content))


def write_tff(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, labels in (("train", TRAIN_LABELS), ("test", TEST_LABELS)):
        with h5py.File(folder / f"fed_emnist_{split}.h5", "w") as handle:
            for writer in WRITERS:
                group = handle.create_group(f"examples/{writer}")
                group.create_dataset("pixels", data=_pixels(writer, labels[writer], split).astype(np.float32))
                group.create_dataset("label", data=np.asarray(labels[writer], dtype=np.int32))


def _check(data, train_order: list[str], test_order: list[str], cap: int) -> None:
    x, y, names = _expected(TRAIN_LABELS, train_order, "train")
    assert data.name == "femnist" and data.num_classes == 62
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape == (len(y), 1, 28, 28)
    assert data.train_images.is_contiguous()
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(x))  # round(x*255), polarity kept
    assert data.train_labels.dtype == torch.int64 and data.train_labels.tolist() == y.tolist()
    assert data.train_writers.dtype == torch.int64
    assert [SORTED[i] for i in data.train_writers.tolist()] == names
    # The balanced test set: the first `cap` of each class, in file order.
    tx, ty, _ = _expected(TEST_LABELS, test_order, "test")
    keep = np.sort(np.concatenate([np.flatnonzero(ty == c)[:cap] for c in np.unique(ty)]))
    assert data.test_images.dtype == torch.uint8 and data.test_images.shape == (keep.size, 1, 28, 28)
    assert data.test_labels.dtype == torch.int64 and data.test_labels.tolist() == ty[keep].tolist()
    assert torch.equal(data.test_images[:, 0], torch.from_numpy(tx[keep]))
    assert np.bincount(data.test_labels.numpy()).max() <= cap


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize("sub", ["femnist", "femnist/data"])
def test_leaf_json_layouts(tmp_path: Path, sub: str) -> None:
    write_leaf(tmp_path / sub)
    data = load_dataset("femnist", tmp_path)
    _check(data, WRITERS, WRITERS, cap=200)  # files by name, writers in each file's order
    assert data.test_labels.numel() == sum(map(len, TEST_LABELS.values()))  # all kept under the cap


@pytest.mark.parametrize("cap", [1, 2])
def test_balanced_test_cap(tmp_path: Path, cap: int) -> None:
    write_leaf(tmp_path / "femnist")
    data = load_femnist(tmp_path, test_per_class=cap)
    _check(data, WRITERS, WRITERS, cap=cap)
    assert np.bincount(data.test_labels.numpy(), minlength=62)[[0, 5, 10, 61]].tolist() == [cap] * 4


@needs_h5py
def test_tff_h5(tmp_path: Path) -> None:
    write_tff(tmp_path / "femnist")
    data = load_femnist(tmp_path, test_per_class=2)
    _check(data, SORTED, SORTED, cap=2)  # HDF5 groups come in name order


@needs_h5py
def test_leaf_wins_over_h5(tmp_path: Path) -> None:
    write_tff(tmp_path / "femnist")
    write_leaf(tmp_path / "femnist")
    _check(load_femnist(tmp_path), WRITERS, WRITERS, cap=200)


def test_h5_without_h5py_says_pip_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "femnist").mkdir()
    for name in ("fed_emnist_train.h5", "fed_emnist_test.h5"):
        (tmp_path / "femnist" / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(ImportError, match="pip install h5py"):
        load_femnist(tmp_path)


def test_hub_table_is_split_per_writer() -> None:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    writers = ["w1"] * 12 + ["w0"] * 3 + ["w1"] * 9  # w1: 21 samples, w0: 3
    labels = rng.integers(0, 62, size=len(writers))
    images = rng.integers(0, 256, size=(len(writers), 28, 28), dtype=np.uint8)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "writer_id": datasets.Value("string"),
            "character": datasets.ClassLabel(num_classes=62),
        }
    )
    hub = datasets.Dataset.from_dict(
        {"image": list(images), "writer_id": writers, "character": labels.tolist()}, features=features
    )
    (train_x, train_y, train_w), (test_x, test_y, test_w) = femnist.split_hub_table(hub, batch_size=7)
    w1 = [i for i, w in enumerate(writers) if w == "w1"]
    test_idx = [w1[9], w1[19]]  # every 10th sample of each writer
    train_idx = [i for i in range(len(writers)) if i not in test_idx]
    assert test_w == ["w1", "w1"] and np.array_equal(test_x, images[test_idx])
    assert test_y.tolist() == labels[test_idx].tolist()
    assert np.array_equal(train_x, images[train_idx]) and train_y.tolist() == labels[train_idx].tolist()
    assert train_w == [writers[i] for i in train_idx]


def test_bad_files_are_reported(tmp_path: Path) -> None:
    write_leaf(tmp_path / "femnist")
    path = min((tmp_path / "femnist" / "train").glob("*.json"))
    content = json.loads(path.read_text())
    content["user_data"][WRITERS[0]]["x"][0][0] = 255.0  # 0..255 instead of 0..1
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"pixel values must lie in \[0, 1\]"):
        load_femnist(tmp_path)
    content["user_data"][WRITERS[0]]["x"][0][0] = 0.5
    content["num_samples"][0] += 1
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="num_samples"):
        load_femnist(tmp_path)


# ------------------------------------------------------------ missing data


def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline() -> None:
        raise ConnectionError("Couldn't reach 'flwrlabs/femnist' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(femnist, "load_hub_splits", offline)


def test_missing_femnist_lists_paths_and_remedies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_hub(monkeypatch)
    (tmp_path / "femnist" / "train").mkdir(parents=True)
    (tmp_path / "femnist" / "train" / "a.json").write_text("{}")  # train without test: incomplete
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("femnist", tmp_path)
    message = str(info.value)
    base = tmp_path.resolve() / "femnist"
    for place in (base / "train", base / "test", base / "data" / "train", base / "fed_emnist_train.h5"):
        assert str(place) in message
    assert "only one of train/ and test/" in message
    assert "flwrlabs/femnist" in message and "OfflineModeIsEnabled" in message
    assert "preprocess.sh" in message and "fed_emnist.tar.bz2" in message and "pip install h5py" in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_femnist_without_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_hub(monkeypatch)
    with pytest.raises(DatasetNotFoundError, match="no data-dir"):
        load_femnist(None)


# ------------------------------------------------------------ writer partition


def test_one_client_per_writer() -> None:
    writers = np.array([3, 0, 2, 0, 1, 3, 4, 2])
    parts = partition_writers(writers, 5)
    assert [p.tolist() for p in parts] == [[1, 3], [4], [2, 7], [0, 5], [6]]
    assert all(p.dtype == np.int64 for p in parts)


def test_fewer_clients_deal_writers_round_robin() -> None:
    writers = np.array([3, 0, 2, 0, 1, 3, 4, 2])
    parts = partition_writers(writers, 2)  # writers 0, 2, 4 -> client 0; 1, 3 -> client 1
    assert [p.tolist() for p in parts] == [[1, 2, 3, 6, 7], [0, 4, 5]]
    # Absent writer ids (e.g. after a subset) are skipped: ranks, not raw ids, are dealt.
    parts = partition_writers(np.array([7, 2, 9, 2]), 3)
    assert [p.tolist() for p in parts] == [[1, 3], [0], [2]]


def test_more_clients_than_writers_is_an_error() -> None:
    with pytest.raises(ValueError, match="num-partitions.*only 3 writers"):
        partition_writers(np.array([0, 1, 2, 2]), 4)
    with pytest.raises(ValueError, match="num-partitions"):
        partition_writers(np.array([0, 1]), 0)


@pytest.fixture(scope="module")
def leaf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("leaf")
    write_leaf(root / "femnist")
    return root


def _federated(root: Path, num_clients: int, **extra: object) -> FederatedData:
    args = {
        "dataset": "femnist",
        "data_dir": root,
        "imbalance_profile": "exp",
        "imbalance_ratio": 100.0,
        "minority_classes": (0, 7, 8),
        "partition": "writers",
        "dirichlet_alpha": 1.0,
        "num_clients": num_clients,
        "seed": 0,
    }
    return load_federated_data(**{**args, **extra})


@pytest.mark.parametrize("num_clients", [5, 2, 1])
def test_federated_writers_keep_the_natural_long_tail(leaf_dir: Path, num_clients: int) -> None:
    fed = _federated(leaf_dir, num_clients)
    labels = np.concatenate([TRAIN_LABELS[w] for w in WRITERS])
    assert fed.num_classes == 62 and fed.num_clients == num_clients
    assert list(fed.class_counts) == np.bincount(labels, minlength=62).tolist()  # no long-tail cut
    assert np.array_equal(fed.train_indices, np.arange(labels.size))
    for pid in range(num_clients):
        images, client_labels = fed.client_data(pid)
        assert images.shape[1:] == (1, 28, 28) and images.dtype == torch.uint8
        own = [SORTED[w] for w in range(len(SORTED)) if w % num_clients == pid]
        assert sorted(client_labels.tolist()) == sorted(label for w in own for label in TRAIN_LABELS[w])
        client_writers = fed.dataset.train_writers[torch.tensor(fed.client_indices[pid])]
        assert {SORTED[i] for i in client_writers.tolist()} == set(own)
    test_images, test_labels = fed.test_data()
    assert test_labels.numel() == sum(map(len, TEST_LABELS.values())) and test_images.shape[1:] == (1, 28, 28)


def test_federated_writers_errors(leaf_dir: Path) -> None:
    with pytest.raises(ValueError, match="num-partitions.*only 5 writers"):
        _federated(leaf_dir, 6)
    with pytest.raises(ValueError, match="partition"):
        _federated(leaf_dir, 5, partition="dirichlet")
    with pytest.raises(ValueError, match="partition.*femnist"):
        _federated(leaf_dir, 5, dataset="mnist")  # refused before any data is read


def test_federated_subset_per_class(leaf_dir: Path) -> None:
    # The first sample of each class belongs to f0300_12 (0, 10, 61) or f0100_40 (5): two writers left.
    fed = _federated(leaf_dir, 2, samples_per_class=1)
    assert list(np.flatnonzero(fed.class_counts)) == [0, 5, 10, 61] and sum(fed.class_counts) == 4
    assert [fed.client_data(pid)[1].tolist() for pid in range(2)] == [[5], [0, 10, 61]]
    with pytest.raises(ValueError, match="only 2 writers"):
        _federated(leaf_dir, 3, samples_per_class=1)
    assert sorted(fed.test_data()[1].tolist()) == [0, 5, 10, 61]


# ------------------------------------------------------------------ config


def test_config_femnist_needs_writers_and_back() -> None:
    with pytest.raises(ConfigError, match="^partition: dataset 'femnist'"):
        resolve({"dataset": "femnist"})
    with pytest.raises(ConfigError, match="^partition: 'writers' needs dataset=femnist"):
        resolve({"partition": "writers"})
    cfg = resolve({"dataset": "femnist", "partition": "writers"})
    assert (cfg.dataset, cfg.partition) == ("femnist", "writers")


def test_femnist_preset() -> None:
    cfg = resolve({"preset": "femnist"})
    assert (cfg.dataset, cfg.model, cfg.partition) == ("femnist", "cnn", "writers")
    assert (cfg.batch_size, cfg.local_lr, cfg.local_epochs, cfg.balance_threshold) == (20, 0.01, 5, 8)
    assert (cfg.num_server_rounds, cfg.clients_per_round) == (500, 20)
