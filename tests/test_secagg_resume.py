"""Checkpoint and resume under secure aggregation.

The protocol keeps nothing across rounds (fresh keys and masks every round, client secrets dropped after
unmasking) and the decoded sum does not depend on the masks, so a checkpoint holds exactly what it holds
without secagg, and a resumed run must continue bit for bit as the uninterrupted one: on the in-process
grid for every server optimizer with RedGrape's prototype store, and through Flower's engine killed and
resumed (e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from app_runs import kill_after_checkpoint, metrics_rows, run_app, without_timing
from flwr.app import ArrayRecord, ConfigRecord, Message
from test_secagg_methods import client_reply, model_arrays
from test_secagg_strategy import NODES, InProcessGrid
from torch import nn

from fedlt_app.checkpoint import save_checkpoint
from fedlt_app.config import RunConfig, resolve
from fedlt_app.methods import get_method
from fedlt_app.models import EncoderClassifier
from fedlt_app.secagg.flower_server import SecureRounds
from fedlt_app.server_app import checkpoint_state, restore
from fedlt_app.strategy import FedLTStrategy, server_optimizer
from fedlt_app.swa import WeightAverage


def _strategy(cfg: RunConfig) -> FedLTStrategy:
    torch.manual_seed(0)
    spec = get_method(cfg.method)
    model = spec.extend_model(EncoderClassifier(nn.Flatten(), 16, 10))
    return FedLTStrategy(server_optimizer(cfg.server_opt, cfg.server_lr, cfg.server_momentum, cfg.local_lr),
                         spec.server(cfg, model, None), model, NODES, 5, cfg.seed,
                         secure=SecureRounds(cfg.secagg_min_cohort, timeout=10.0))


def _rounds(strategy: FedLTStrategy, arrays: ArrayRecord, count: int) -> ArrayRecord:
    """``count`` rounds as Flower's loop runs them (its round numbers start at 1 in every run)."""
    grid = InProcessGrid()  # a new Flower run: fresh node contexts
    for flower_round in range(1, count + 1):
        messages = list(strategy.configure_train(flower_round, arrays, ConfigRecord(), grid))
        replies: list[Message] = [client_reply(strategy.server_method.cfg.method, m, grid, True) for m in messages]
        new, _ = strategy.aggregate_train(flower_round, replies)
        assert new is not None
        arrays = new
    return arrays


@pytest.mark.parametrize("optimizer", ["fedavg", "fedavgm", "fedadam"])
def test_a_resumed_secure_run_continues_bit_for_bit(task_identity, tmp_path: Path,
                                                     optimizer: str) -> None:
    cfg = resolve({"method": "redgrape", "secure-aggregation": "secagg", "server-opt": optimizer,
                   "server-momentum": 0.9, "server-lr": 0.5})
    full = _strategy(cfg)
    expected = _rounds(full, model_arrays(full), 3)

    first = _strategy(cfg)
    arrays = _rounds(first, model_arrays(first), 2)
    save_checkpoint(tmp_path, checkpoint_state(first, cfg, 2, arrays, WeightAverage(0)))
    resumed = _strategy(cfg)
    resumed.round_offset, restored = restore(resumed, cfg, tmp_path, WeightAverage(0))  # as the ServerApp does
    assert resumed.round_offset == 2
    got = _rounds(resumed, restored, 1)  # the ServerApp starts from the checkpointed arrays

    for key in expected:
        assert np.array_equal(got[key].numpy(), expected[key].numpy()), key
    store, reference = resumed.server_method, full.server_method
    assert np.array_equal(store.weight, reference.weight) and np.array_equal(store.known, reference.known)
    assert resumed.current is not None and resumed.current.server_round == 3


SECURE = ("method='redgrape' secure-aggregation='secagg' server-opt='fedadam' server-lr=0.01 samples-per-class=60 "
          "imbalance-ratio=10.0 num-server-rounds=3 checkpoint-every=1")


@pytest.mark.e2e
def test_killed_secure_run_resumes_to_the_uninterrupted_result(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_app(tmp_path, monkeypatch, f"{SECURE} output-dir='{tmp_path}' run-name='ref'") == 0
    run_dir = tmp_path / "cut"
    killed_at = kill_after_checkpoint(tmp_path, f"{SECURE} output-dir='{tmp_path}' run-name='cut'", run_dir, 1)
    assert killed_at == 1
    assert run_app(tmp_path, monkeypatch, f"{SECURE} resume-from='{run_dir}'") == 0
    assert without_timing(metrics_rows(run_dir)) == without_timing(metrics_rows(tmp_path / "ref"))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
