"""``fedlt-sweep``: run a grid of fedlt runs and tabulate it like the paper.

A sweep file (``conf/sweeps/<name>.yaml``) names a base run config, a grid of
run-config keys, a list of seeds and the table's rows; :mod:`fedlt_app.sweep_grid`
reads it and validates every cell (one point of the grid and one seed) before
anything runs. Then the cells run one after another through the real app (:func:`fedlt_app.launch.run`), each into
``<output>/<sweep>/runs/<cell-name>/``. A cell is finished when its
``summary.json`` says ``completed``: a second invocation skips it, so a killed
sweep resumes where it stopped. An interrupted cell whose folder holds a
checkpoint (``checkpoint-every``) is continued from it with ``resume-from``,
in its own folder, when its method keeps no state on its clients (then the
continued run is the uninterrupted one, to the digit); any other cell that
left partial results is re-run into ``<cell-name>-retry<k>`` (the app never
overwrites a run directory).
At the end (and with ``--report-only``) the tables and plots of
:mod:`fedlt_app.report` are written next to the runs.

The sweep-file format is described in the README ("Reproducing the paper's tables").
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlt_app import report, sweep_results
from fedlt_app.config import recorded_value
from fedlt_app.run_folder import run_status
from fedlt_app.sweep_grid import (
    Cell,
    SweepError,
    SweepSpec,
    expand,
    load_spec,
    parse_only,
    run_config_arg,
    selected,
    with_settings,
)
from fedlt_app.sweep_results import value_text

APP_DIR = Path(__file__).resolve().parent.parent
# Run-config keys that do not change a run's results: a finished run still
# counts when only these differ from the sweep file (e.g. data moved).
NOT_IDENTITY = frozenset({"preset", "run-name", "output-dir", "data-dir", "device", "wandb-mode", "wandb-project",
                          "resume-from", "pictures", "persist-client-state"})
CELL_LOG = "cells.jsonl"  # one line per cell run: name, run name, exit code, status, wall seconds


def _same(a: Any, b: Any) -> bool:
    """YAML/JSON values compare as the user means them: 10 == 10.0, but True != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return a == b


# ------------------------------------------------------------ running cells


@dataclass(frozen=True)
class CellRun:
    """Everything a runner needs to run one cell into ``run_dir``."""

    cell: Cell
    run_name: str
    run_dir: Path
    run_config: Mapping[str, Any]  # cell.overrides + output-dir + run-name
    run_config_arg: str  # the same, as ``--run-config`` text
    num_clients: int
    cpus: int
    gpus: float
    timeout: float
    app_dir: Path
    flwr_home: Path  # the sweep's own Flower home (SuperLink config and logs)


Runner = Callable[[CellRun], int]


def launch_runner(run: CellRun) -> int:
    """The default runner: the real app through Flower's simulation engine.

    Each sweep uses its own ``FLWR_HOME``: the launcher writes the address of
    the SuperLink it starts into ``$FLWR_HOME/config.toml``, so a ``fedlt-run``
    started meanwhile from the same app directory would otherwise redirect
    this run's status queries to its own SuperLink.
    """
    import os

    from fedlt_app import launch

    before = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(run.flwr_home)
    try:
        return launch.run(run.app_dir, run.run_config_arg, run.num_clients, run.cpus, run.gpus, run.timeout)
    finally:
        if before is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = before


@dataclass(frozen=True)
class CellState:
    # "completed"; "resume" (the last attempt stopped after a checkpoint: continue it with resume-from);
    # "partial" (results but no completed summary, nothing to continue: re-run as -retry<k>); or "new"
    status: str
    completed: Path | None
    next_name: str
    resume_from: Path | None = None


def cell_state(runs_dir: Path, name: str) -> CellState:
    """Where a cell stands. An interrupted attempt with a checkpoint whose resume replays the uninterrupted run
    (``methods.resumes_exactly``) is continued in its own folder; any other is re-run from round 1."""
    from fedlt_app.checkpoint import CHECKPOINT_FILE  # torch: only when a sweep plans its cells

    attempts = sweep_results.attempts(runs_dir, name)
    done = sweep_results.completed_attempt(runs_dir, name)
    if done is not None:
        return CellState("completed", done, name)
    if not attempts:
        return CellState("new", None, name)
    last = attempts[-1]  # oldest first
    if (last / CHECKPOINT_FILE).is_file() and replays_from_checkpoint(last):
        return CellState("resume", None, last.name, resume_from=last)
    return CellState("partial", None, f"{name}-retry{sweep_results.retry_index(last.name, name) + 1}")


def replays_from_checkpoint(run_dir: Path) -> bool:
    """An interrupted run whose resume gives the uninterrupted run's results (a method keeping no state on its
    clients, or clients that wrote theirs to the run folder); an unreadable config.json: no."""
    from fedlt_app.methods import resumes_exactly

    try:
        return resumes_exactly(json.loads((run_dir / "config.json").read_text())["run_config"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_finished_run(cell: Cell, run_dir: Path) -> None:
    """A finished run counts only if it ran what the sweep file says now."""
    try:
        info = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise SweepError(f"cell {cell.name}: {run_dir}/config.json is unreadable ({err})") from err
    ran = info.get("run_config", {})
    differ = [
        f"{k}: ran {recorded_value(ran, k)!r}, sweep says {v!r}"
        for k, v in cell.run_config.items()
        if k not in NOT_IDENTITY and not _same(recorded_value(ran, k), v)
    ]
    if "num_clients" in info and info["num_clients"] != cell.num_clients:
        differ.append(f"num-clients: ran {info['num_clients']}, sweep says {cell.num_clients}")
    if differ:
        raise SweepError(
            f"cell {cell.name}: the finished run {run_dir} does not match the sweep file ({'; '.join(differ)}); "
            f"the sweep file changed since it ran: use another sweep name or --output, or remove that run"
        )


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class SweepOutcome:
    sweep_dir: Path
    cells: list[Cell]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    not_selected: list[str] = field(default_factory=list)
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.stopped


def source_in_checkout(source: str) -> str:
    """The sweep file as this checkout names it (``conf/sweeps/<name>.yaml``) when it lies inside the checkout:
    ``sweep.json`` is committed, and ``collect`` finds the file again from it in whichever clone reads it."""
    path = Path(source)
    if path.is_absolute() and path.is_relative_to(APP_DIR):
        return path.relative_to(APP_DIR).as_posix()
    return source


def sweep_manifest(spec: SweepSpec, cells: Sequence[Cell]) -> dict[str, Any]:
    return {
        "name": spec.name,
        "description": spec.description,
        "source": source_in_checkout(spec.source),
        "rows": list(spec.rows),
        "columns": list(spec.columns),
        "ablation": spec.ablation,
        "paired": {"key": spec.paired[0], "references": list(spec.paired[1])} if spec.paired else None,
        "seeds": list(spec.seeds),
        "axes": [
            {"key": a.key, "values": [value_text(v) for v in a.values], "bundle": a.is_bundle} for a in spec.axes
        ],
        "axis_labels": dict(spec.axis_labels),
        "value_labels": {k: dict(v) for k, v in spec.value_labels.items()},
        "spec": json.loads(json.dumps(spec.raw, default=str)),
        "cells": [c.describe() for c in cells],
    }


def run_sweep(
    spec: SweepSpec,
    output: str | Path,
    runner: Runner = launch_runner,
    *,
    only: Mapping[str, set[str]] | None = None,
    app_dir: str | Path = APP_DIR,
    cpus: int | None = None,
    gpus: float | None = None,
    timeout: float | None = None,
    dry_run: bool = False,
    max_failures_in_a_row: int = 3,
    write_report: bool = True,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
    clock: Callable[[], float] = time.monotonic,
) -> SweepOutcome:
    """Run every unfinished (selected) cell of ``spec`` under ``<output>/<spec.name>/``.

    ``runner`` runs one cell and returns an exit code (0 = completed); tests
    inject one that writes the app's outputs. Cells are validated before any
    runs; finished ones are skipped; partial ones re-run as ``-retry<k>``.
    ``cpus``/``gpus`` override every cell's resources (not its identity).
    """
    cells = expand(spec)
    only = only or {}
    sweep_dir = Path(output).expanduser().resolve() / spec.name
    runs_dir = sweep_dir / "runs"
    outcome = SweepOutcome(sweep_dir, cells)

    plan: list[tuple[Cell, CellState]] = []
    for cell in cells:
        state = cell_state(runs_dir, cell.name)
        if state.completed is not None:
            _check_finished_run(cell, state.completed)
        plan.append((cell, state))
    todo = [(c, s) for c, s in plan if s.status != "completed" and selected(c, only)]
    outcome.not_selected = [c.name for c, _ in plan if not selected(c, only)]
    if not dry_run and any((gpus if gpus is not None else c.gpus) > 0 for c, _ in todo):
        _check_gpu()
    total = len(cells)
    log(
        f"[sweep] {spec.name}: {total} cells ({len(spec.seeds)} seeds"
        + (f", up to {len(spec.all_seeds)} by more-seeds" if spec.more_seeds else "") + "), "
        f"{sum(s.status == 'completed' for _, s in plan)} finished, {len(todo)} to run"
        + (f", {len(outcome.not_selected)} not selected by --only" if outcome.not_selected else "")
        + f" -> {sweep_dir}"
    )
    if dry_run:
        for k, (cell, state) in enumerate(plan, 1):
            what = {"completed": "finished, skip", "partial": f"partial results, re-run as {state.next_name}",
                    "resume": f"interrupted, continue {state.next_name} from its checkpoint",
                    "new": "run"}[state.status]
            if state.status != "completed" and not selected(cell, only):
                what = "not selected"
            log(f"[sweep] cell {k}/{total} {cell.name}: {what}")
            arg = run_config_arg(cell.overrides)
            log(f"         --num-clients {cpus_text(cell, cpus, gpus)} --run-config \"{arg}\"")
        return outcome

    sweep_dir.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps(sweep_manifest(spec, cells), indent=2))
    started = clock()
    run_seconds = 0.0
    run_rounds = 0
    prior = _prior_seconds_per_round(sweep_dir, plan)
    failures_in_a_row = 0
    rounds_left = sum(c.run_config["num-server-rounds"] for c, _ in todo)
    for k, (cell, state) in enumerate(plan, 1):
        if state.status == "completed":
            outcome.skipped.append(cell.name)
            log(f"[sweep] cell {k}/{total} {cell.name}: finished earlier ({state.completed.name}), skipped")
            continue
        if not selected(cell, only):
            continue
        rate = run_seconds / run_rounds if run_rounds else prior
        remaining = f"estimated remaining {duration(rate * rounds_left)}" if rate else "estimated remaining unknown"
        retry = {"partial": f" (partial results left; re-running as {state.next_name})",
                 "resume": f" (interrupted; continuing {state.next_name} from its checkpoint)"}.get(state.status, "")
        log(f"[sweep] cell {k}/{total} {cell.name}: elapsed {duration(clock() - started)}, {remaining}{retry}")
        run_config = {**cell.overrides, "output-dir": str(runs_dir), "run-name": state.next_name}
        if state.resume_from is not None:  # the app continues in the checkpoint's folder
            run_config["resume-from"] = str(state.resume_from)
        run = CellRun(
            cell=cell,
            run_name=state.next_name,
            run_dir=runs_dir / state.next_name,
            run_config=run_config,
            run_config_arg=run_config_arg(run_config),
            num_clients=cell.num_clients,
            cpus=cpus if cpus is not None else cell.cpus,
            gpus=gpus if gpus is not None else cell.gpus,
            timeout=timeout if timeout is not None else spec.timeout,
            app_dir=Path(app_dir),
            flwr_home=sweep_dir / "flwr-home",
        )
        cell_started = clock()
        code = runner(run)
        took = clock() - cell_started
        rounds = cell.run_config["num-server-rounds"]
        rounds_left -= rounds
        status = run_status(run.run_dir) or ("partial" if run.run_dir.exists() else "no results")
        with open(sweep_dir / CELL_LOG, "a", encoding="utf-8") as cell_log:
            cell_log.write(json.dumps({
                "cell": cell.name, "run_name": run.run_name, "exit_code": code, "status": status,
                "seconds": round(took, 3), "rounds": rounds, "ended": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }) + "\n")
        if code == 0 and status == "completed":
            run_seconds += took
            run_rounds += rounds
            failures_in_a_row = 0
            outcome.ran.append(cell.name)
            log(f"[sweep] cell {k}/{total} {cell.name}: completed in {duration(took)}")
        else:
            failures_in_a_row += 1
            outcome.failed.append(cell.name)
            log(f"[sweep] cell {k}/{total} {cell.name}: FAILED after {duration(took)} (exit code {code}); "
                f"a later invocation re-runs it")
            if failures_in_a_row >= max_failures_in_a_row:
                outcome.stopped = True
                log(f"[sweep] {failures_in_a_row} cells failed in a row; stopping (see the logs above)")
                break
    log(f"[sweep] {spec.name}: ran {len(outcome.ran)}, skipped {len(outcome.skipped)}, failed {len(outcome.failed)} "
        f"in {duration(clock() - started)}")
    if write_report:
        for path in report.write_report(sweep_dir, log=log):
            log(f"[sweep] wrote {path}")
    return outcome


def cpus_text(cell: Cell, cpus: int | None, gpus: float | None) -> str:
    c = cpus if cpus is not None else cell.cpus
    g = gpus if gpus is not None else cell.gpus
    return f"{cell.num_clients} --cpus-per-client {c} --gpus-per-client {value_text(g)}"


def _prior_seconds_per_round(sweep_dir: Path, plan: Sequence[tuple[Cell, CellState]]) -> float:
    """Wall seconds per round of the cells run by earlier invocations (``cells.jsonl``), for the first
    estimate; failing that, the finished runs' own round times (which miss each run's start-up)."""
    seconds = rounds = 0.0
    try:
        for line in (sweep_dir / CELL_LOG).read_text().splitlines():
            entry = json.loads(line)
            if entry.get("status") == "completed":
                seconds += float(entry["seconds"])
                rounds += int(entry["rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        seconds = rounds = 0.0
    if rounds:
        return seconds / rounds
    for _, state in plan:
        if state.completed is None:
            continue
        try:
            summary = json.loads((state.completed / "summary.json").read_text())
            seconds += float(summary["total_seconds"])
            rounds += int(summary["rounds"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return seconds / rounds if rounds else 0.0


def _check_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SweepError(
            "this sweep asks for gpus-per-client > 0 but torch sees no CUDA device (Ray would wait forever for one); "
            "run it with --gpus-per-client 0 on a CPU-only machine"
        )


# ---------------------------------------------------------------------- CLI


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlt-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="a sweep file, e.g. conf/sweeps/cpu-fmnist-ir100.yaml")
    parser.add_argument("--output", type=Path, default=Path("results"), help="results root (default: results)")
    parser.add_argument("--dry-run", action="store_true", help="validate every cell and print the plan; run nothing")
    parser.add_argument("--report-only", action="store_true", help="only (re)write the tables and plots")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=V[,V]",
                        help="run only the cells with these grid values (repeatable; e.g. --only seed=0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set a run-config or launcher key in every cell (repeatable; e.g. --set data-dir=/data)")
    parser.add_argument("--app", type=Path, default=APP_DIR, help="the Flower app directory (default: this app)")
    parser.add_argument("--cpus-per-client", type=int, help="override every cell's CPU cores per client")
    parser.add_argument("--gpus-per-client", type=float, help="override every cell's GPU fraction (0 on a CPU machine)")
    parser.add_argument("--timeout", type=float, help="per-cell time limit in seconds (default: the sweep file's)")
    parser.add_argument("--max-failures-in-a-row", type=int, default=3, help="stop after this many (default 3)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # unwind like Ctrl-C: the launcher then stops its SuperLink
    try:
        spec = with_settings(load_spec(args.spec), args.set)
        if args.report_only:
            sweep_dir = args.output.expanduser().resolve() / spec.name
            if (sweep_dir / "sweep.json").is_file():  # the report's own keys (e.g. paired) may be newer
                (sweep_dir / "sweep.json").write_text(json.dumps(sweep_manifest(spec, expand(spec)), indent=2))
            for path in report.write_report(args.output.expanduser().resolve() / spec.name):
                print(f"[sweep] wrote {path}")
            return 0
        outcome = run_sweep(
            spec,
            args.output,
            only=parse_only(args.only, spec),
            app_dir=args.app,
            cpus=args.cpus_per_client,
            gpus=args.gpus_per_client,
            timeout=args.timeout,
            dry_run=args.dry_run,
            max_failures_in_a_row=args.max_failures_in_a_row,
        )
    except (SweepError, sweep_results.ReportError) as err:
        print(f"fedlt-sweep: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[sweep] interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if outcome.failed:
        print(f"fedlt-sweep: {len(outcome.failed)} cell(s) failed: {', '.join(outcome.failed)}", file=sys.stderr)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
