"""The real ServerApp and ClientApp in one process: a federation without Ray or a SuperLink.

``run_in_process`` calls the ServerApp's ``main`` with a grid that hands every message to the ClientApp
(``fedlt_app.client_app.app``, dispatched by message type as the engine does) and returns its reply; a
handler's exception becomes an error reply, as in Flower. Everything fedlt does (discovery, the strategy,
the methods' payloads, statistics queries, client state in ``context.state``, secure aggregation's query
rounds, the recorder) runs as in a simulation; what is left out is only what Flower does around it
(SuperLink, Ray actors, serialisation to the wire, separate processes). One run costs seconds instead of
the engine's ~40 s of start-up, so the per-method wiring tests use it, and ``app_runs.run_app`` keeps the
real engine for what depends on it (launcher, reproducibility across processes, resume, failures, TLS).

Runs here are deterministic but not bit-identical to the engine's: server and clients share one
process's global torch RNG.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from app_runs import without_pictures
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.config import parse_config_args
from flwr.supercore.task_identity import TaskIdentity

from fedlt_app import client_app, server_app
from fedlt_app.active import client as active_client

FIRST_NODE = 1000
ROOT = Path(__file__).resolve().parent.parent


def app_run_config(overrides: str) -> dict[str, Any]:
    """What ``flwr run . --run-config OVERRIDES`` hands the apps: pyproject's defaults, then the overrides."""
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**defaults, **parse_config_args([overrides] if overrides else None)}


class InProcessGrid:
    """A Flower ``Grid`` whose nodes are ClientApp contexts in this process."""

    def __init__(self, run_config: Mapping[str, Any], num_clients: int) -> None:
        self.contexts = {
            FIRST_NODE + p: Context(run_id=1, node_id=FIRST_NODE + p,
                                    node_config={"partition-id": p, "num-partitions": num_clients},
                                    state=RecordDict(), run_config=dict(run_config))
            for p in range(num_clients)
        }
        self.delivered: list[str] = []  # message types, in the order they were sent

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            self.delivered.append(message.metadata.message_type)
            try:
                replies.append(client_app.app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as err:  # noqa: BLE001 - the engine turns a failing handler into an error reply
                replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message))
        return replies


def give_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction Messages (built by FedAvg.configure_train, the secagg protocol, ...) read the run's identity;
    outside a running Flower app there is none (the engine sets it), so give them the one a server grid has."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def run_in_process(tmp: Path, monkeypatch: pytest.MonkeyPatch, run_config: str, num_clients: int = 3) -> int:
    """One run of the app in this process; ``app_runs.run_app``'s signature, so a test can switch engines.

    Returns 0; a failing run raises (its traceback is the test's). ``tmp`` is unused (no Flower home).
    Pictures are off unless ``run_config`` asks for them, as in ``run_app``.
    """
    del tmp
    give_task_identity(monkeypatch)
    # a fresh worker: no model cached by an earlier test's run (the caches' keys assume one run per process)
    monkeypatch.setattr(client_app, "_MODELS", {})
    monkeypatch.setattr(active_client, "_MODELS", {})
    config = app_run_config(without_pictures(run_config))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    server_app.main(InProcessGrid(config, num_clients), context)
    return 0


def small_finished_run(tmp: Path, monkeypatch: pytest.MonkeyPatch, run_config: str) -> tuple[Path, dict[str, Any]]:
    """A small 2-client run in fp32 with a checkpoint every round; returns its folder and its last round's metrics.

    fp32 as the benchmarks that probe such runs: 'auto' evaluates in bf16 on a CPU with AVX-512 BF16, a tenth of a
    point away at this size.
    """
    out = tmp / "out"
    run_in_process(tmp, monkeypatch, f"{run_config} samples-per-class=60 imbalance-ratio=10.0 precision='fp32' "
                   f"checkpoint-every=1 output-dir='{out}' run-name='r'", num_clients=2)
    run_dir = out / "r"
    return run_dir, json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


class Call(NamedTuple):
    """One recorded call of a method: the instance, its positional arguments and what it returned."""

    instance: Any
    args: tuple[Any, ...]
    result: Any


def record_calls(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[Call]:
    """Wrap ``cls.<name>`` for this test so that every call (server or client side of an in-process run)
    is appended to the returned list; the method itself runs unchanged."""
    calls: list[Call] = []
    original = getattr(cls, name)

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        calls.append(Call(self, args, result))
        return result

    monkeypatch.setattr(cls, name, recording)
    return calls


def run_off_and_secagg(tmp: Path, monkeypatch: pytest.MonkeyPatch, run_config: str, num_clients: int = 3,
                       run_name: str = "run") -> dict[str, Path]:
    """``run_config`` twice in process, with secure-aggregation off and secagg (W&B off); each run's folder by mode."""
    folders = {}
    for mode in ("off", "secagg"):
        code = run_in_process(tmp, monkeypatch, f"{run_config} secure-aggregation='{mode}' output-dir='{tmp / mode}' "
                              f"run-name='{run_name}' wandb-mode='disabled'", num_clients=num_clients)
        assert code == 0
        folders[mode] = tmp / mode / run_name
    return folders
