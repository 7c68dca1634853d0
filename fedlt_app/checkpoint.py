"""Resumable server state, written atomically every ``checkpoint-every`` rounds.

A checkpoint holds everything the next round depends on: the global model,
the server optimizer's state (FedAvgM's momentum, FedAdam's moments), the
method's server state (RedGrape's prototype store, CLIMB's duals, CReFF's
federated features...), the server's torch RNG and the round index. Client
randomness is keyed by seed, round and partition id, so a resumed run replays
exactly what an uninterrupted one would have done. A method that keeps state
on its clients (``ClientMethod.state``, MOON's previous models) is not here:
the clients write it to the run folder themselves (``fedlt_app.client_state``,
``persist-client-state``); without that, a resumed run (a new Flower run)
starts it afresh.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedlt_app.config import recorded_value

if TYPE_CHECKING:
    from fedlt_app.config import RunConfig

CHECKPOINT_FILE = "checkpoint.pt"
# The network the last round evaluated (a re-training method's calibrated head included), for inference.
FINAL_MODEL_FILE = "final_model.pt"
# Attributes of Flower's FedAvgM / FedOpt strategies that carry state between rounds.
_OPTIMIZER_ATTRIBUTES = ("current_arrays", "momentum_vector", "m_t", "v_t")
# Keys that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = frozenset(
    {"resume-from", "run-name", "output-dir", "num-server-rounds", "checkpoint-every", "round-timeout",
     "max-failure-fraction", "persist-client-state", "wandb-mode", "wandb-project", "device",
     "debug-fail-partitions", "debug-hang-partitions", "debug-pause-after-checkpoint", "pictures"}
)


def _plain(value: Any) -> Any:
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": {k: a.numpy() for k, a in value.items()}}
    return value


def _flower(value: Any) -> Any:
    if isinstance(value, dict) and "__arrayrecord__" in value:
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in value["__arrayrecord__"].items()})
    return value


def optimizer_state(strategy: object) -> dict[str, Any]:
    return {name: _plain(getattr(strategy, name)) for name in _OPTIMIZER_ATTRIBUTES if hasattr(strategy, name)}


def restore_optimizer_state(strategy: object, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(strategy, name, _flower(value))


def _save_atomically(path: Path, state: dict[str, Any]) -> Path:
    """Write then rename, so a crash mid-write never leaves a torn file."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)
    return path


def save_checkpoint(run_dir: Path, state: dict[str, Any], pause_after: float = 0.0) -> Path:
    """Write ``checkpoint.pt`` atomically, then wait ``pause_after`` seconds (``debug-pause-after-checkpoint``).

    The pause is fault injection: a test that kills a run once a checkpoint appears would otherwise race rounds
    that take a tenth of a second, and could find the run already past the round it meant to resume from.
    """
    path = _save_atomically(run_dir / CHECKPOINT_FILE, state)
    if pause_after > 0:
        time.sleep(pause_after)
    return path


def save_final_model(run_dir: Path, state: Mapping[str, torch.Tensor], run_config: dict[str, Any],
                     num_clients: int, server_round: int) -> Path:
    """The evaluated network's travelling state with the run config that rebuilds it.

    Unlike the checkpoint's global model this is what the run's last accuracy was measured on: for a method
    that evaluates a re-trained classifier (CCVR, CReFF) the calibrated head, not the aggregated one.
    """
    return _save_atomically(run_dir / FINAL_MODEL_FILE, {
        "round": server_round,
        "run_config": run_config,
        "num_clients": num_clients,  # with run_config, rebuilds the federation's data and so the network
        "state": {key: tensor.detach().cpu().clone() for key, tensor in state.items()},
    })


def load_final_model(run_dir: Path) -> dict[str, Any]:
    """``{"round", "run_config", "num_clients", "state"}`` of :func:`save_final_model` (``fedlt_app.task.trained_model``
    builds the network from it)."""
    path = Path(run_dir) / FINAL_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {FINAL_MODEL_FILE} in {run_dir}: the run has not finished its last round")
    return torch.load(path, weights_only=True)


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"resume-from: no {CHECKPOINT_FILE} in {run_dir} (was checkpoint-every 0?)")
    return torch.load(path, weights_only=False)


def check_resumable(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a resume that would change the run; a key newer than the checkpoint counts as
    what runs did before it existed (:func:`fedlt_app.config.recorded_value`)."""
    saved = {k: recorded_value(saved, k) for k in current}
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(f"resume-from: the run config differs from the checkpointed run ({details})")


def _shown(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else repr(value)


def check_schedule_kept(saved: RunConfig, current: RunConfig, rounds_done: int,
                        round_plan: Callable[[RunConfig, int], Mapping[str, Any]]) -> None:
    """Refuse a resume whose new ``num-server-rounds`` changes what a finished round did.

    Some of a round's work depends on its place among all the rounds (the learning rate past
    ``lr-decay-after`` of them, RUCR's last rectification rounds, a last-round calibration). Growing
    ``num-server-rounds`` moves those points; a finished round that would now fall on the other side
    was trained under another schedule, and the resumed run would be neither the checkpointed run nor
    an uninterrupted run of the new length. ``round_plan(cfg, r)``: what round ``r`` does, by name.
    """
    if saved.num_server_rounds == current.num_server_rounds:
        return
    for server_round in range(1, rounds_done + 1):
        before, now = round_plan(saved, server_round), round_plan(current, server_round)
        moved = [f"{name} {_shown(before[name])} -> {_shown(now[name])}"
                 for name in before if before[name] != now[name]]
        if moved:
            raise ValueError(
                f"resume-from: num-server-rounds {saved.num_server_rounds} -> {current.num_server_rounds} changes "
                f"round {server_round}, which the checkpointed run has finished ({', '.join(moved)}); resume with "
                f"num-server-rounds {saved.num_server_rounds}, or start a new run"
            )
