"""A client method's state on disk (``fedlt_app.client_state``): what a resumed node reads, and what stays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedlt_app.client_state import (
    CLIENT_STATE_KEY,
    StateFiles,
    load_client_state,
    persisted_state_config,
    save_client_state,
)


def files(root: Path, server_round: int, resumed_after: int = 0, every: int = 10, partition: int = 3) -> StateFiles:
    config = ConfigRecord({**persisted_state_config(root, resumed_after), "server-round": server_round})
    return StateFiles.from_config(config, partition, every)


def state(value: float) -> dict[str, np.ndarray]:
    # key names that np.savez's own arguments would swallow, and a nested-looking one (MOON's)
    return {"file": np.full((2, 3), value, np.float32), "keys": np.array([int(value)], np.int64),
            "previous-model/encoder.conv1.weight": np.arange(4, dtype=np.float64) * value}


def on_disk(root: Path, partition: int = 3) -> list[str]:
    return sorted(p.name for p in (root / "client-state" / f"partition-{partition}").iterdir())


def assert_same(loaded: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value), key


def test_the_server_names_the_run_folder_and_the_round_resumed_after(tmp_path: Path) -> None:
    config = persisted_state_config(tmp_path / "run", 30)
    at = files(tmp_path / "run", 31, resumed_after=30)
    assert at.folder == (tmp_path / "run").resolve() / "client-state" / "partition-3"
    assert (at.server_round, at.resumed_after, at.checkpoint_every) == (31, 30, 10)
    assert StateFiles.from_config(ConfigRecord({"server-round": 4}), 3, 10) is None  # a run that does not persist
    assert int(config["client-state-resumed-after"]) == 30


def test_a_resumed_node_reads_the_last_state_up_to_the_checkpoint_never_a_later_one(tmp_path: Path) -> None:
    # a node of a partial-participation run trained in rounds 4, 12 and 17; the run was killed after round 17,
    # its last checkpoint is round 10's
    for server_round, value in ((4, 4.0), (12, 12.0), (17, 17.0)):
        files(tmp_path, server_round).save(state(value))
    # round 17's for the next round, round 4's for a resume from the checkpoint of round 10; 12's: neither
    assert on_disk(tmp_path) == ["round-17.npz", "round-4.npz"]
    # resumed after round 10, its first round back is 15: the state it had at the checkpoint is round 4's
    assert_same(load_client_state(RecordDict(), files(tmp_path, 15, resumed_after=10)), state(4.0))
    assert load_client_state(RecordDict(), files(tmp_path, 2, resumed_after=0)) == {}  # a new run: nothing
    # in memory (the same Flower run) wins over the disk
    node = RecordDict()
    save_client_state(node, state(15.0), files(tmp_path, 15, resumed_after=10))
    assert_same(load_client_state(node, files(tmp_path, 18, resumed_after=10)), state(15.0))
    # writing round 15 dropped the killed run's later rounds (never to be read) and kept round 4 for the
    # checkpoint of round 10, still the one on disk
    assert on_disk(tmp_path) == ["round-15.npz", "round-4.npz"]


def test_a_node_keeps_its_newest_file_and_the_one_the_checkpoint_on_disk_needs(tmp_path: Path) -> None:
    for server_round in range(1, 8):  # every 3 rounds a checkpoint
        files(tmp_path, server_round, every=3).save(state(float(server_round)))
    assert on_disk(tmp_path) == ["round-6.npz", "round-7.npz"]
    # a last-round checkpoint that is no multiple of checkpoint-every (round 7 of a 7-round run), resumed
    # with more rounds: round 7's state is the one a resume from it needs until round 9's checkpoint
    files(tmp_path, 8, resumed_after=7, every=3).save(state(8.0))
    assert on_disk(tmp_path) == ["round-7.npz", "round-8.npz"]
    assert_same(load_client_state(RecordDict(), files(tmp_path, 8, resumed_after=7, every=3)), state(7.0))


def test_nothing_to_keep_writes_nothing_and_clears_memory(tmp_path: Path) -> None:
    node = RecordDict()
    save_client_state(node, state(1.0), files(tmp_path, 1))
    save_client_state(node, {}, files(tmp_path, 2))
    assert CLIENT_STATE_KEY not in node and on_disk(tmp_path) == ["round-1.npz"]
    save_client_state(RecordDict(), {}, files(tmp_path, 1, partition=5))
    assert not (tmp_path / "client-state" / "partition-5").exists()
