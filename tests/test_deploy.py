"""Real deployment on loopback: scripts/deploy_local.sh (SuperLink + SuperNodes over TLS).

Every process the script starts carries the script's FLWR_HOME (under the
test's work directory) in its environment; the tests look for survivors by
that, and kill any they find so that a failing test leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "deploy_local.sh"
SCRIPT_TIMEOUT = 600  # seconds; the run itself gets a bit less (--timeout)
SMALL = "samples-per-class=100 imbalance-ratio=10.0 num-server-rounds=2"

needs_linux_openssl = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("openssl") is None,
    reason="needs /proc (to find leftover processes) and openssl (to make certificates)",
)


def processes_of(work: Path) -> dict[int, str]:
    """pid -> command line of live processes started for this work directory."""
    marker = f"FLWR_HOME={work}".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":  # already dead, only waiting to be reaped
            continue
        if any(var.startswith(marker) for var in environ.split(b"\0")) or str(work).encode() in cmdline:
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def kill_all(work: Path) -> None:
    for pid in processes_of(work):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Deployment:
    work: Path
    code: int
    out: str
    err: str
    seconds: float
    survivors: dict[int, str]

    def explain(self) -> str:
        return (f"exit {self.code} after {self.seconds:.0f} s\n--- stdout ---\n{self.out[-4000:]}\n"
                f"--- stderr ---\n{self.err[-4000:]}")


def deploy(work: Path, *args: str) -> Deployment:
    """Run the script (from another directory: it must find the app itself)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--work-dir", str(work), "--timeout", str(SCRIPT_TIMEOUT - 60), *args],
        cwd=work.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=SCRIPT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script's trap stops what it started
        out, err = proc.communicate(timeout=60)
    seconds = time.monotonic() - started
    time.sleep(0.5)
    return Deployment(work, proc.returncode, out, err, seconds, processes_of(work))


@pytest.fixture
def work_dir(tmp_path: Path):
    work = tmp_path / "deploy"
    yield work
    kill_all(work)  # whatever happened in the test


@pytest.fixture(scope="module")
def tls_run(tmp_path_factory: pytest.TempPathFactory):
    """2 SuperNodes over TLS, node 1 on local files exported from its partition; 2 RedGrape rounds."""
    tmp = tmp_path_factory.mktemp("deploy-tls")
    work = tmp / "deploy"
    try:
        run = deploy(
            work,
            "--num-nodes", "2",
            "--local-data",
            "--run-config", f"method='redgrape' {SMALL} output-dir='{tmp / 'out'}' run-name='deploy'",
        )
        stamps = [line for line in run.out.splitlines() if line.startswith("deploy_local [")]
        print(f"\n[test_deploy] TLS deployment wall time: {run.seconds:.1f} s", *stamps, sep="\n  ")
        (tmp / "wall_seconds.txt").write_text(f"{run.seconds:.1f}\n")
        yield run, tmp / "out" / "deploy"
    finally:
        kill_all(work)


@pytest.mark.e2e
@needs_linux_openssl
def test_tls_run_completes_and_exchanges_prototypes(tls_run, record_property) -> None:
    run, results = tls_run
    record_property("deploy_wall_seconds", round(run.seconds, 1))
    assert run.code == 0, run.explain()
    assert "finished:completed" in run.out
    rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == [0, 1] and r["failed_clients"] == [] for r in rows)
    assert rows[-1]["classes_with_prototype"] == 10
    # round 2 sends the global prototypes down with the model
    assert rows[1]["parameters_down"] > rows[0]["parameters_down"]
    assert json.loads((results / "summary.json").read_text())["status"] == "completed"


@pytest.mark.e2e
@needs_linux_openssl
def test_tls_was_used_and_node_1_read_its_local_files(tls_run) -> None:
    run, _ = tls_run
    assert run.code == 0, run.explain()
    config = (run.work / "flwr-home" / "config.toml").read_text()
    assert f'root-certificates = "{run.work / "certs" / "ca.crt"}"' in config and "insecure" not in config
    assert "Uvicorn running on https://127.0.0.1:" in (run.work / "logs" / "superlink.log").read_text()
    local_file = run.work / "local-data" / "node-1" / "train.npz"
    assert local_file.is_file()
    node1 = (run.work / "logs" / "supernode-1.log").read_text()
    node0 = (run.work / "logs" / "supernode-0.log").read_text()
    assert node1.count("local data: ") == 2 and str(local_file) in node1  # both rounds
    assert "local data" not in node0


@pytest.mark.e2e
@needs_linux_openssl
def test_tls_run_leaves_no_process(tls_run) -> None:
    run, _ = tls_run
    assert run.survivors == {}, run.survivors


@pytest.mark.e2e
@needs_linux_openssl
def test_failed_run_exits_non_zero_and_cleans_up(work_dir: Path, tmp_path: Path) -> None:
    run = deploy(work_dir, "--num-nodes", "1", "--run-config", f"dirichlet-alpha=-1.0 output-dir='{tmp_path / 'out'}'")
    assert run.code == 1, run.explain()
    assert "finished:failed" in run.err, run.explain()
    assert run.survivors == {}, run.survivors
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in (["--num-nodes", "0"], ["--bogus"], ["--timeout", "soon"]):
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                              cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert "usage: scripts/deploy_local.sh" in done.stderr


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory: pytest.TempPathFactory):
    """3 SuperNodes over TLS (secure aggregation's smallest default cohort), 2 RedGrape rounds under secagg."""
    tmp = tmp_path_factory.mktemp("deploy-secagg")
    work = tmp / "deploy"
    try:
        run = deploy(
            work,
            "--num-nodes", "3",
            "--run-config", f"method='redgrape' secure-aggregation='secagg' {SMALL} "
                            f"output-dir='{tmp / 'out'}' run-name='secagg'",
        )
        print(f"\n[test_deploy] TLS + secagg deployment wall time: {run.seconds:.1f} s")
        yield run, tmp / "out" / "secagg"
    finally:
        kill_all(work)


@pytest.mark.e2e
@needs_linux_openssl
def test_secagg_over_tls_completes_with_masked_uploads_only(secagg_run) -> None:
    run, results = secagg_run
    assert run.code == 0, run.explain()
    assert "finished:completed" in run.out
    config = (run.work / "flwr-home" / "config.toml").read_text()
    assert f'root-certificates = "{run.work / "certs" / "ca.crt"}"' in config and "insecure" not in config
    assert "Uvicorn running on https://127.0.0.1:" in (run.work / "logs" / "superlink.log").read_text()
    rows = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == [0, 1, 2] and r["failed_clients"] == [] for r in rows)
    assert rows[-1]["classes_with_prototype"] == 10  # the prototype sums and holder counts came through
    # what went up is the masked int64 vectors (8 bytes a value) plus the protocol's keys and shares
    assert all(r["parameters_up"] > 0 and r["bytes_up"] > 8 * r["parameters_up"] for r in rows)
    assert json.loads((results / "summary.json").read_text())["status"] == "completed"
    assert run.survivors == {}, run.survivors
