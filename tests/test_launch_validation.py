"""``fedlt-run`` validates the run config before it starts a SuperLink (no simulation here)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlt_app import launch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_superlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private FLWR_HOME, and starting a SuperLink (or any Flower command) fails the test."""
    real_popen = launch.subprocess.Popen

    def popen(args: list[str], *rest: object, **kwargs: object) -> subprocess.Popen:
        if Path(str(args[0])).name in ("flower-superlink", "flwr"):
            raise AssertionError(f"a Flower process was started: {args}")
        return real_popen(args, *rest, **kwargs)  # e.g. torch's import runs ldconfig

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


def rejected(run_config: str, capsys: pytest.CaptureFixture[str], home: Path) -> str:
    """Run the launcher on a bad config; check it exits 2 at once and return its stderr."""
    start = time.monotonic()
    code = launch.run(ROOT, run_config, num_clients=2, cpus=1, gpus=0.0, timeout=60)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert elapsed < 15, elapsed
    assert "fedlt-run: invalid run config:" in err
    assert not home.exists()
    return err


def test_a_bad_value_fails_before_a_superlink(capsys: pytest.CaptureFixture[str], no_superlink: Path) -> None:
    assert "dirichlet-alpha" in rejected("dirichlet-alpha=-1.0", capsys, no_superlink)


def test_an_unknown_key_is_named(capsys: pytest.CaptureFixture[str], no_superlink: Path) -> None:
    assert "no-such-key" in rejected("no-such-key=1", capsys, no_superlink)


def test_a_precision_this_device_lacks_is_named(capsys: pytest.CaptureFixture[str], no_superlink: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is valid where CUDA is visible")
    assert "precision" in rejected("precision='fp16'", capsys, no_superlink)


def test_the_preset_is_merged(capsys: pytest.CaptureFixture[str], no_superlink: Path) -> None:
    assert "preset" in rejected("preset='no-such-preset'", capsys, no_superlink)


def test_a_malformed_string_fails_cleanly(capsys: pytest.CaptureFixture[str], no_superlink: Path) -> None:
    assert "invalid format" in rejected("method='fedavg", capsys, no_superlink)


def test_a_valid_config_passes() -> None:
    launch.check_run_config(ROOT, "method='fedavg' num-server-rounds=2")
    launch.check_run_config(ROOT, "")


def test_the_launcher_does_not_import_torch() -> None:
    code = "import sys, fedlt_app.launch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0
