"""Label hygiene: no query reads the label of an unlabeled sample.

The client's labels are wrapped so that reading one outside the current
labeled set raises; every query path (FairFAL's two passes, entropy, random,
the oracle, labeled-only training, and the Flower handlers end to end in
process) must pass through it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedlt_app.active import client as active_client
from fedlt_app.active import protocol
from fedlt_app.active.local_only import LocalOnlySetup, train_local_only
from fedlt_app.active.pool import ClientPool
from fedlt_app.active.query import FairFALSettings, entropy_query, fairfal_query, fairfal_statistics, random_query
from fedlt_app.config import resolve
from fedlt_app.models import build_model


class LabelLeak(AssertionError):
    pass


class GuardedLabels:
    """A label container that raises when any position outside ``allowed()`` is read."""

    def __init__(self, labels: torch.Tensor, allowed: Callable[[], np.ndarray]) -> None:
        self._labels = labels
        self._allowed = allowed
        self.reads = 0

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        positions = np.asarray(index, dtype=np.int64).reshape(-1)
        leaked = np.setdiff1d(positions, self._allowed())
        if leaked.size:
            raise LabelLeak(f"read the labels of unlabeled samples {leaked[:5].tolist()}")
        self.reads += 1
        return self._labels[torch.from_numpy(np.asarray(index, dtype=np.int64))]

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise LabelLeak("iterated over every label")

    def __array__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise LabelLeak("converted every label to an array")


def guarded_pool(images: torch.Tensor, labels: torch.Tensor, labeled: np.ndarray) -> tuple[ClientPool, GuardedLabels]:
    holder: dict[str, ClientPool] = {}
    guard = GuardedLabels(labels, lambda: holder["pool"].labeled)
    holder["pool"] = ClientPool(images, guard, labeled)
    return holder["pool"], guard


def _toy(num: int = 90, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % classes
    images = torch.randint(0, 60, (num, 1, 28, 28), dtype=torch.uint8, generator=generator)
    for cls in range(classes):  # a learnable bright band per class
        images[labels == cls, :, 8 * cls : 8 * cls + 6, :] = 250
    return images, labels


def test_the_guard_catches_a_read_of_an_unlabeled_label() -> None:
    images, labels = _toy()
    pool, guard = guarded_pool(images, labels, np.arange(10))
    with pytest.raises(LabelLeak):
        guard[np.array([50])]
    with pytest.raises(LabelLeak):
        np.asarray(guard)
    assert pool.labeled_labels().tolist() == labels[:10].tolist()


def test_every_query_path_reads_labeled_labels_only() -> None:
    images, labels = _toy()
    pool, guard = guarded_pool(images, labels, np.arange(0, 90, 6))
    torch.manual_seed(0)
    global_model = build_model("cnn", 3, 1, 28).eval()
    local_model = build_model("cnn", 3, 1, 28)
    generator = torch.Generator().manual_seed(0)
    x, y = pool.labeled_data()
    train_local_only(local_model, x, y, LocalOnlySetup(epochs=3, dataset="fmnist"), generator)
    r, d = fairfal_statistics(pool, global_model, local_model, "fmnist")
    assert 0.0 < r <= 1.0 and 0.0 <= d < 1.0
    for r_bar in (0.1, 0.9):  # both model choices
        picks = fairfal_query(pool, global_model, local_model, d, r_bar, 7, FairFALSettings(), "fmnist")
        assert len(picks) == 7 and not np.isin(picks, pool.labeled).any()
    assert len(entropy_query(pool, global_model, 7, "fmnist")) == 7
    assert len(random_query(pool, 7, np.random.default_rng(0))) == 7
    before = guard.reads
    revealed = pool.reveal(picks)  # the oracle: labels of the picked samples only, after they are labeled
    assert revealed.tolist() == labels[torch.from_numpy(picks)].tolist() and guard.reads == before + 1
    with pytest.raises(ValueError, match="already labeled"):
        pool.reveal(picks[:1])


def test_training_on_the_labeled_set_reads_labeled_labels_only() -> None:
    images, labels = _toy()
    holder: dict[str, np.ndarray] = {"labeled": np.array([3, 5, 7])}
    guard = GuardedLabels(labels, lambda: holder["labeled"])
    state = RecordDict({protocol.LABELED_STATE: ArrayRecord({"positions": _array(holder["labeled"])})})
    x, y = active_client.restrict_to_labeled(ConfigRecord({protocol.TRAIN_ON_LABELED: True}), state, images, guard)
    assert len(x) == 3 and y.tolist() == labels[[3, 5, 7]].tolist()
    x, y = active_client.restrict_to_labeled(ConfigRecord(), state, images, labels)  # not an AL round: untouched
    assert len(x) == len(images)


def _array(values: np.ndarray):  # type: ignore[no-untyped-def]
    from flwr.app import Array

    return Array(np.asarray(values, dtype=np.int64))


# ------------------------------------------- the Flower handlers, in process


def _message(action: str, content: RecordDict) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m-{action}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=3600.0, message_type=f"query.{action}")
    return Message(content=content, metadata=metadata)


@pytest.mark.parametrize("al_method", ["fairfal", "random", "entropy"])
def test_the_handlers_label_exactly_the_budget_through_the_guard(
    al_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_config = {"al-method": al_method, "samples-per-class": 60, "imbalance-ratio": 5.0, "partition": "dir-balance",
                  "dirichlet-alpha": 1.0, "method": "fedavg", "fairfal-local-epochs": 2, "device": "cpu",
                  "al-report-query-counts": True}
    cfg = resolve(run_config)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(),
                      run_config=run_config)
    real_client_dataset = active_client.client_dataset
    guards: list[GuardedLabels] = []

    def guarded_client_dataset(cfg_, node_config):  # type: ignore[no-untyped-def]
        data, images, labels = real_client_dataset(cfg_, node_config)
        state = context.state
        guard = GuardedLabels(labels, lambda: active_client.labeled_positions(state)
                              if protocol.LABELED_STATE in state else np.empty(0, np.int64))
        guards.append(guard)
        return data, images, guard

    monkeypatch.setattr(active_client, "client_dataset", guarded_client_dataset)
    # the oracle reads right after it extends the labeled set, before it is stored: allow those positions
    original_reveal = ClientPool.reveal

    def reveal(self: ClientPool, positions):  # type: ignore[no-untyped-def]
        self._labels._allowed = lambda: np.union1d(self.labeled, np.asarray(positions))
        return original_reveal(self, positions)

    monkeypatch.setattr(ClientPool, "reveal", reveal)

    reply = active_client.handle_init(_message(protocol.INIT, RecordDict({"config": ConfigRecord({"initial": 6})})),
                                      context)
    metrics = reply.content["metrics"]
    assert metrics["num-labeled"] == 6 and sum(metrics["queried-per-class"]) == 6
    first = active_client.labeled_positions(context.state).copy()

    data, _, _ = real_client_dataset(cfg, context.node_config)
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("cnn", data.num_classes, 1, 28).state_dict())
    if al_method == "fairfal":
        stats = active_client.handle_stats(
            _message(protocol.STATS, RecordDict({"arrays": arrays, "config": ConfigRecord({"cycle": 1})})), context)
        assert set(stats.content["metrics"].keys()) == {"r", "d"} and not stats.content.array_records
        assert protocol.LOCAL_MODEL_STATE in context.state  # kept on the client for pass 2
    select = RecordDict({"arrays": arrays, "config": ConfigRecord({"cycle": 1, "budget": 5, "r-bar": 0.3})})
    reply = active_client.handle_select(_message(protocol.SELECT, select), context)
    metrics = reply.content["metrics"]
    assert metrics["num-labeled"] == 11 and metrics["num-queried"] == 5 and sum(metrics["queried-per-class"]) == 5
    assert not reply.content.array_records
    labeled = active_client.labeled_positions(context.state)
    assert np.isin(first, labeled).all() and labeled.size == 11  # grew by exactly the budget, kept the old ones
    assert metrics["selection-digest"] == protocol.selection_digest(labeled)
    assert protocol.LOCAL_MODEL_STATE not in context.state
    assert guards  # the handlers did go through the guarded data
