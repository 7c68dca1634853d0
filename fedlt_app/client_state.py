"""Where a client method's persistent arrays live between the rounds its node trains in.

A method that keeps arrays on its client (MOON's previous local model, Fed-GraB's controllers, FedLoGe's
local head: ``ClientMethod.state_to_keep``) finds them again the next time the node trains:

- **in memory**, in the node's Flower ``context.state`` (``CLIENT_STATE_KEY``), for the rest of one Flower run;
- **on disk**, when the run writes checkpoints and ``persist-client-state`` is on: the server names a folder
  in every train message (``STATE_DIR_KEY``, ``client-state/`` in the run folder) and each client writes
  ``partition-<id>/round-<t>.npz`` there after every round it trained in. A run continued with
  ``resume-from`` is a new Flower run, whose nodes' memory is empty: there a node reads the newest file of a
  round at or before the checkpoint the run continues from (``RESUMED_AFTER_KEY``), which is exactly the
  state the uninterrupted run had, so the resumed run replays it (rounds after the checkpoint that a killed
  run had already trained are never read, and are removed when the node trains again).

A node keeps at most two files: its newest, and the newest at or before the latest checkpoint (what a
resume from that checkpoint needs). The state never leaves the client: in a deployment the folder is the
server's path, interpreted on each SuperNode's own disk.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedlt_app.records import payload_to_record, record_to_payload

ClientState = dict[str, np.ndarray]

# The node's Flower ``context.state`` entry that holds the method's arrays.
CLIENT_STATE_KEY = "method-state"
# Train-config entries the server sets when clients persist their state.
STATE_DIR_KEY = "client-state-dir"
RESUMED_AFTER_KEY = "client-state-resumed-after"
STATE_FOLDER = "client-state"
_KEYS = "keys"  # the file's array of state keys, in the order of its arrays arr_0, arr_1, ...
_ROUND_FILE = re.compile(r"^round-(\d+)\.npz$")


def persisted_state_config(run_dir: Path, resumed_after: int) -> ConfigRecord:
    """The train-config entries that make clients persist their state in ``run_dir`` (the server's side).

    ``resumed_after``: the round of the checkpoint this run continues from (0: a new run).
    """
    return ConfigRecord({STATE_DIR_KEY: str(run_dir.expanduser().resolve() / STATE_FOLDER),
                         RESUMED_AFTER_KEY: int(resumed_after)})


@dataclass(frozen=True)
class StateFiles:
    """One node's state files for one round it trains in."""

    folder: Path  # this partition's
    server_round: int
    resumed_after: int
    checkpoint_every: int

    @classmethod
    def from_config(cls, config: ConfigRecord, partition_id: int, checkpoint_every: int) -> StateFiles | None:
        """The node's files as the train message's config names them; None when the run does not persist."""
        if STATE_DIR_KEY not in config:
            return None
        return cls(Path(str(config[STATE_DIR_KEY])) / f"partition-{partition_id}", int(config["server-round"]),
                   int(config.get(RESUMED_AFTER_KEY, 0)), checkpoint_every)

    def _rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m[1]) for p in self.folder.iterdir() if (m := _ROUND_FILE.match(p.name)))

    def _path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round}.npz"

    def load(self) -> ClientState:
        """What the node kept after the last round it trained in at or before the checkpoint resumed from."""
        kept = [r for r in self._rounds() if r <= self.resumed_after]
        if not kept:
            return {}
        with np.load(self._path(kept[-1]), allow_pickle=False) as saved:
            return {str(key): saved[f"arr_{i}"] for i, key in enumerate(saved[_KEYS])}

    def save(self, state: ClientState) -> None:
        """Write this round's state atomically, then drop the files no resume can need any more."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f"round-{self.server_round}.tmp.npz"
        np.savez(partial, *state.values(), **{_KEYS: np.array(list(state), dtype=str)})  # any key name
        os.replace(partial, self._path(self.server_round))
        # the checkpoint on disk now: the latest multiple of checkpoint-every before this round, or the one the
        # run resumed from (a last-round checkpoint of the run it continues need not be a multiple)
        checkpointed = max((self.server_round - 1) // self.checkpoint_every * self.checkpoint_every,
                           self.resumed_after)
        for stale in self.folder.glob("round-*.tmp.npz"):  # a write a kill interrupted (this node's only writer)
            stale.unlink(missing_ok=True)
        rounds = self._rounds()
        needed = {self.server_round} | {max((r for r in rounds if r <= checkpointed), default=-1)}
        for r in rounds:
            if r not in needed:
                self._path(r).unlink(missing_ok=True)


def resume_files(state_dir: Path, resumed_after: int) -> list[Path]:
    """The files in a run's ``client-state/`` that a resume after round ``resumed_after`` reads: per node, its
    newest at or before that round (what ``collect`` commits beside an unfinished run's checkpoint)."""
    needed = []
    for partition in sorted(p for p in state_dir.glob("partition-*") if p.is_dir()):
        rounds = [int(m[1]) for f in partition.iterdir() if (m := _ROUND_FILE.match(f.name))]
        kept = [r for r in rounds if r <= resumed_after]
        if kept:
            needed.append(partition / f"round-{max(kept)}.npz")
    return needed


def load_client_state(node_state: RecordDict, files: StateFiles | None = None) -> ClientState:
    """The arrays this node's method kept the last time it trained: in memory in this Flower run, else (a
    resumed run's first round on this node) from ``files``; empty before that."""
    record = node_state.get(CLIENT_STATE_KEY)
    if isinstance(record, ArrayRecord):
        return record_to_payload(record)
    return files.load() if files is not None else {}


def save_client_state(node_state: RecordDict, arrays: ClientState, files: StateFiles | None = None) -> None:
    """Replace the node's stored method state (nothing to keep: drop it), and write it to ``files`` if given."""
    if arrays:
        node_state[CLIENT_STATE_KEY] = payload_to_record(arrays)
        if files is not None:
            files.save(arrays)
    elif CLIENT_STATE_KEY in node_state:
        del node_state[CLIENT_STATE_KEY]
