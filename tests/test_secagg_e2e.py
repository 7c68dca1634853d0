"""secure-aggregation=secagg through Flower's real simulation engine, one client failing in training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from app_runs import run_app

pytestmark = pytest.mark.e2e


def test_secagg_run_with_a_failing_client_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = run_app(
        tmp_path, monkeypatch,
        f"method='fedavg' secure-aggregation='secagg' num-server-rounds=2 samples-per-class=60 imbalance-ratio=10.0 "
        f"debug-fail-partitions='1' output-dir='{tmp_path}' run-name='s'",
        num_clients=4,
    )
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["failed_clients"] == [1] for r in rows)
    assert all(math.isfinite(r["train_loss"]) and r["accuracy"] > 0 for r in rows)
