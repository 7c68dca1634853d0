"""``fedlt-run``: one simulation run that fails loudly when the run fails.

``flwr run .`` (flwr 1.42) leaves three traps for a researcher: its managed
``:local:`` SuperLink outlives the run and keeps the environment and working
directory of whoever started it first; that SuperLink installs the app's
dependencies at run time (which fails offline); and ``flwr run`` exits 0 even
when the run failed.  This launcher starts its own simulation SuperLink on a
free loopback port, from the app's directory and with runtime installs off,
submits the run with ``flwr run``, streams its log, waits for the final status
and exits non-zero unless the run finished as completed.  The SuperLink is
always stopped afterwards.  The run config is validated before anything starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path

import click

CONNECTION = "fedlt-sim"
QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_DEDUP_LOGS": "0",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _flwr(name: str) -> str:
    """Prefer the executables next to this interpreter (the app's venv)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _wait_healthy(port: int, superlink: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if superlink.poll() is not None:
            raise RuntimeError(f"flower-superlink exited early; see {log_path}:\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"flower-superlink did not become healthy in {timeout:.0f} s; see {log_path}")


def _processes_of(home: Path) -> list[int]:
    """Pids whose environment names this launch's FLWR_HOME (SuperExec detaches itself)."""
    marker = f"FLWR_HOME={home}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and int(entry.name) != os.getpid():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _stop(superlink: subprocess.Popen, home: Path) -> None:
    """Stop the SuperLink, then anything of this launch that escaped its process group."""
    try:
        os.killpg(superlink.pid, signal.SIGTERM)
        superlink.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for pid in _processes_of(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _run_status(run_id: int, env: dict[str, str]) -> str:
    out = subprocess.run(
        [_flwr("flwr"), "list", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        capture_output=True, text=True, env=env, check=False,
    )
    try:
        runs = json.loads(out.stdout)["runs"]
        return str(runs[0]["status"])
    except (ValueError, KeyError, IndexError):
        return "unknown"


STREAM_WAIT_SECONDS = 15  # how often the SuperLink's liveness is checked
STATUS_CHECK_SECONDS = 300  # how often the status is asked while the log still streams


def wait_for_run(status_of_run: Callable[[], str], streamer: subprocess.Popen, superlink: subprocess.Popen,
                 timeout: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> str:
    """Wait until the run finishes, the SuperLink exits or ``timeout`` seconds pass; return the run's status.

    ``flwr log --stream`` returns when the run ends, so the status is asked then. Asking
    costs a ``flwr list`` process, 1-2 CPU-seconds: while the stream is alive it is asked
    only every ``STATUS_CHECK_SECONDS`` (so a stream that hangs cannot hold the launcher), once
    the stream has dropped every ``STREAM_WAIT_SECONDS``. Asking every 15 s throughout, as
    fedlt did before, took ~5 % of a two-core machine from the clients.
    """
    deadline = clock() + timeout
    next_check = clock() + STATUS_CHECK_SECONDS
    status = "unknown"
    while clock() < deadline:
        streaming = streamer.poll() is None
        if streaming:
            with contextlib.suppress(subprocess.TimeoutExpired):
                streamer.wait(timeout=STREAM_WAIT_SECONDS)
        else:
            sleep(STREAM_WAIT_SECONDS)
        if superlink.poll() is not None:
            return "superlink-exited"
        if streamer.poll() is None and clock() < next_check:
            continue
        next_check = clock() + STATUS_CHECK_SECONDS
        status = status_of_run()
        if status.startswith("finished"):
            return status
    return status


def check_run_config(app_dir: Path, run_config: str) -> None:
    """Resolve and validate the run config the app would see; raise naming the bad key.

    For fast feedback: a bad value fails here in about a second instead of after
    a SuperLink and a ServerApp have started (the ServerApp keeps its own
    validation for plain ``flwr run``).  The config is Flower's merge of the
    app's ``[tool.flwr.app.config]`` defaults with the ``--run-config``
    overrides, parsed as Flower parses them; the precision is checked against
    the device of this machine, where the simulation runs.
    """
    from flwr.common.config import parse_config_args

    from fedlt_app.config import resolve

    with (app_dir / "pyproject.toml").open("rb") as f:
        defaults = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    if run_config.endswith(".toml") and not Path(run_config).expanduser().is_absolute():
        run_config = str(app_dir / run_config)  # `flwr run` reads it from the app directory
    cfg = resolve({**defaults, **parse_config_args([run_config])})

    from fedlt_app.precision import precision_for  # these import torch
    from fedlt_app.task import resolve_device

    precision_for(cfg.precision, resolve_device(cfg.device))


def run(
    app_dir: Path, run_config: str, num_clients: int, cpus: int, gpus: float, timeout: float, *, validate: bool = True
) -> int:
    """Run the app once through the simulation engine; return a process exit code."""
    app_dir = app_dir.resolve()
    if validate:
        try:
            check_run_config(app_dir, run_config)
        except (ValueError, OSError, click.ClickException) as err:
            message = err.format_message() if isinstance(err, click.ClickException) else str(err)
            print(f"fedlt-run: invalid run config: {message}", file=sys.stderr)
            return 2
    port = _free_port()
    # One Flower home per launch: concurrent launches never share a config.toml,
    # and whatever outlives the SuperLink can be found by it.
    home = Path(os.environ.get("FLWR_HOME", app_dir / ".flwr-home")).resolve() / f"launch-{port}"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(home)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log_path = home / f"superlink-{port}.log"
    with open(log_path, "w") as log_file:
        superlink = subprocess.Popen(
            [_flwr("flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=app_dir, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    streamer: subprocess.Popen | None = None
    try:
        _wait_healthy(port, superlink, log_path)
        federation = f"num-supernodes={num_clients} client-resources-num-cpus={cpus} client-resources-num-gpus={gpus}"
        command = [_flwr("flwr"), "run", str(app_dir), CONNECTION, "--format", "json",
                   "--federation-config", federation]
        if run_config:
            command += ["--run-config", run_config]
        submitted = subprocess.run(command, capture_output=True, text=True, env=env, cwd=app_dir, check=False)
        try:
            run_id = int(json.loads(submitted.stdout)["run-id"])
        except (ValueError, KeyError):
            print(submitted.stdout, submitted.stderr, sep="\n", file=sys.stderr)
            print("fedlt-run: the run was not accepted (see the message above)", file=sys.stderr)
            return 2
        print(f"fedlt-run: run {run_id} submitted ({num_clients} virtual clients); streaming its log", flush=True)
        streamer = subprocess.Popen([_flwr("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=env)
        status = wait_for_run(lambda: _run_status(run_id, env), streamer, superlink, timeout)
    finally:
        if streamer is not None:
            streamer.terminate()
        _stop(superlink, home)
    if status != "finished:completed":
        print(f"fedlt-run: run {run_id} ended with status {status!r}; SuperLink log: {log_path}", file=sys.stderr)
        return 1
    print(f"fedlt-run: run {run_id} {status}", flush=True)
    return 0


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` that stops the SuperLink runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlt-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("app", nargs="?", default=".", type=Path, help="the Flower app directory (default: .)")
    parser.add_argument("--run-config", default="", help='overrides, e.g. "method=\'fedavg\' num-server-rounds=5"')
    parser.add_argument("--num-clients", type=int, default=10, help="virtual clients (SuperNodes), default 10")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="CPU cores per virtual client (an int)")
    parser.add_argument("--gpus-per-client", type=float, default=0.0, help="GPU fraction per client, e.g. 0.25")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="give up after this many seconds")
    args = parser.parse_args(argv)
    if args.num_clients < 1:
        parser.error("--num-clients must be >= 1")
    _exit_on_sigterm()
    return run(args.app, args.run_config, args.num_clients, args.cpus_per_client, args.gpus_per_client, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
