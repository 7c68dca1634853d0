"""Running the real app from a test: one Flower home per test, the launcher's own timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlt_app import launch

ROOT = Path(__file__).resolve().parent.parent


def run_app(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, run_config: str, num_clients: int = 3, validate: bool = True
) -> int:
    """``fedlt-run`` on this checkout with a private FLWR_HOME under ``tmp``; returns its exit code.

    ``validate=False`` skips the launcher's up-front config check, so the ServerApp's own runs.
    """
    monkeypatch.setenv("FLWR_HOME", str(tmp / "flwr-home"))
    return launch.run(ROOT, run_config, num_clients=num_clients, cpus=1, gpus=0.0, timeout=600, validate=validate)
