"""Running the real app from a test: one Flower home per test, the launcher's own timeout, a kill mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedlt_app import launch
from fedlt_app.results import TIMING_FIELDS

ROOT = Path(__file__).resolve().parent.parent


def run_app(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, run_config: str, num_clients: int = 3, validate: bool = True
) -> int:
    """``fedlt-run`` on this checkout with a private FLWR_HOME under ``tmp``; returns its exit code.

    ``validate=False`` skips the launcher's up-front config check, so the ServerApp's own runs.
    """
    monkeypatch.setenv("FLWR_HOME", str(tmp / "flwr-home"))
    return launch.run(ROOT, without_pictures(run_config), num_clients=num_clients, cpus=1, gpus=0.0, timeout=600,
                      validate=validate)


def without_pictures(run_config: str) -> str:
    """``run_config`` with ``pictures=false`` unless it names ``pictures``: drawing is seconds a run, and the
    suite's runs check their metrics (one real run keeps its pictures, tests/test_e2e_simulation.py)."""
    return run_config if "pictures=" in run_config else f"{run_config} pictures=false".strip()


def metrics_rows(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per round."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    """Rows without their wall-clock fields, the only ones two runs of one seed may differ in."""
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def kill_after_checkpoint(tmp: Path, run_config: str, run_dir: Path, at_round: int, num_clients: int = 3,
                          limit: float = 600, pause: float = 5.0) -> int:
    """``fedlt-run`` in a subprocess (FLWR_HOME under ``tmp``), stopped with SIGTERM as soon as ``run_dir``
    holds a checkpoint of round ``at_round`` or later; returns the round the checkpoint holds then.

    The launcher takes the SuperLink and the ServerApp down with it, as a crash or a pre-empted job would. The
    ServerApp waits ``pause`` seconds after each checkpoint (``debug-pause-after-checkpoint``): small test rounds
    take a tenth of a second, and without the window the run finished before the SIGTERM reached it.
    """
    env = {**os.environ, "FLWR_HOME": str(tmp / "flwr-home")}
    run_config = f"{without_pictures(run_config)} debug-pause-after-checkpoint={pause}"
    command = [sys.executable, "-m", "fedlt_app.launch", str(ROOT), "--num-clients", str(num_clients),
               "--run-config", run_config]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run_dir / "checkpoint.pt"
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            if checkpoint.exists() and torch.load(checkpoint, weights_only=False)["round"] >= at_round:
                break
            assert launcher.poll() is None, "the run ended before it could be killed"
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    return int(torch.load(checkpoint, weights_only=False)["round"])
