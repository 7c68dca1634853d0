"""fedlt-sweep and its report: grid expansion, validation, resume, the tables' numbers, the notebook.

No test here runs the real app: a fake runner (tests/fixtures/fake_runs.py) writes each cell's
outputs through the app's own RunRecorder, i.e. in the real output format.
"""

from __future__ import annotations

import collections
import csv
import json
import math
import os
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fixtures.fake_runs import fake_runner, write_run

from fedlt_app import report, report_plots, sweep, sweep_grid, sweep_results
from fedlt_app.config import defaults, resolve
from fedlt_app.run_folder import run_status
from fedlt_app.sweep_grid import SweepError

ROOT = Path(__file__).resolve().parent.parent
SWEEP_FILES = sorted((ROOT / "conf" / "sweeps").glob("*.yaml"))


def small_spec(**changes: Any) -> sweep_grid.SweepSpec:
    data: dict[str, Any] = {
        "name": "small",
        "base": {"num-server-rounds": 12, "samples-per-class": 50},
        "num-clients": 3,
        "rows": "method",
        "grid": {"method": ["fedavg", "fedprox", "redgrape"], "imbalance-ratio": [10.0, 100.0]},
        "row-overrides": {"fedprox": {"prox-mu": 0.01}},
        "seeds": [0, 1, 2],
    }
    data.update(changes)
    return sweep_grid.parse_spec(data)


def quiet(lines: list[str] | None = None):  # type: ignore[no-untyped-def]
    return (lambda line: lines.append(line)) if lines is not None else (lambda line: None)


# ------------------------------------------------------------ expansion


def test_grid_expands_rows_columns_and_seeds_in_order() -> None:
    spec = small_spec()
    cells = sweep_grid.expand(spec)
    assert len(cells) == 3 * 2 * 3
    assert spec.rows == ("method",) and spec.columns == ("imbalance-ratio",)
    assert cells[0].name == "method-fedavg__imbalance-ratio-10__seed-0"
    assert [c.seed for c in cells[:3]] == [0, 1, 2]  # seeds innermost
    assert cells[3].name == "method-fedavg__imbalance-ratio-100__seed-0"
    assert len({c.name for c in cells}) == len(cells)
    fedprox = [c for c in cells if c.coords["method"] == "fedprox"]
    assert all(c.run_config["prox-mu"] == 0.01 for c in fedprox)
    assert all(c.run_config["prox-mu"] == 0.0 for c in cells if c.coords["method"] != "fedprox")
    cell = cells[4]
    assert cell.row == ("fedavg",) and cell.column == ("100",) and cell.seed == 1
    assert cell.num_clients == 3 and cell.cpus == 1 and cell.gpus == 0.0
    # only what differs from the schema defaults is passed to the app, typed by the schema
    assert cell.overrides == {"method": "fedavg", "samples-per-class": 50, "num-server-rounds": 12, "seed": 1}
    assert cells[0].overrides["imbalance-ratio"] == 10.0 and isinstance(cells[0].overrides["imbalance-ratio"], float)


def test_the_sweep_expands_presets_itself() -> None:
    """The app lets a preset override any key left at its schema default (local-epochs=1 is the default);
    the sweep passes the preset's values explicitly instead, so what runs is what the file says."""
    spec = small_spec(base={"preset": "fmnist-lt", "local-epochs": 1, "num-server-rounds": 3})
    cell = sweep_grid.expand(spec)[0]
    assert resolve({"preset": "fmnist-lt", "local-epochs": 1}).local_epochs == 5  # the trap
    assert cell.run_config["local-epochs"] == 1 and cell.run_config["preset"] == "fmnist-lt"
    assert "preset" not in cell.overrides and "local-epochs" not in cell.overrides
    seen = resolve({**defaults(), **cell.overrides})  # what the app sees: pyproject defaults + overrides
    assert seen.local_epochs == 1 and seen.num_server_rounds == 3 and seen.dataset == "fmnist"


def test_bundles_overrides_exclude_and_launcher_keys() -> None:
    spec = sweep_grid.parse_spec({
        "name": "b",
        "rows": ["method", "server-opt"],
        "gpus-per-client": 0.0,
        "grid": {
            "method": ["fedavg", "fedprox"],
            "server-opt": ["fedavg", "fedadam"],
            "setting": {"full": {"num-clients": 10}, "partial": {"num-clients": 50, "clients-per-round": 10}},
        },
        "exclude": [{"method": "fedprox", "server-opt": "fedadam"}],
        "overrides": [{"when": {"method": "fedprox"}, "set": {"prox-mu": 0.01}},
                      {"when": {"server-opt": "fedadam"}, "set": {"server-lr": 0.01}}],
    })
    cells = sweep_grid.expand(spec)
    assert len(cells) == (2 * 2 - 1) * 2
    assert spec.columns == ("setting",)
    partial = next(c for c in cells if c.coords == {"method": "fedavg", "server-opt": "fedadam", "setting": "partial"})
    assert partial.name == "method-fedavg__server-opt-fedadam__partial__seed-0"
    assert partial.num_clients == 50 and partial.run_config["clients-per-round"] == 10
    assert partial.run_config["server-lr"] == 0.01 and "num-clients" not in partial.run_config


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_every_sweep_file_validates(path: Path) -> None:
    spec = sweep_grid.load_spec(path)
    cells = sweep_grid.expand(spec)
    assert spec.name == path.stem
    assert len({c.name for c in cells}) == len(cells)
    assert all(set(c.run_config) == set(defaults()) for c in cells)  # every key resolved


def test_the_converged_queue_names_every_unfinished_cell_once() -> None:
    """scripts/sweep_queue.sh's order file: a setting added to the sweep must be queued, a typo must not be."""
    spec = sweep_grid.load_spec(ROOT / "conf" / "sweeps" / "converged-fmnist-ir100.yaml")
    runs = ROOT / "results" / "converged-fmnist-ir100" / "runs"
    cells = {(c.coords["setting"], c.seed): sweep.cell_state(runs, c.name).status for c in sweep_grid.expand(spec)}
    lines = (ROOT / "conf" / "sweeps" / "converged-fmnist-ir100.queue").read_text().splitlines()
    queued = [(line.split()[0], int(line.split()[1])) for line in lines if line.strip() and not line.startswith("#")]
    assert len(queued) == len(set(queued)) and set(queued) <= set(cells)
    assert {cell for cell, status in cells.items() if status != "completed"} <= set(queued)


def test_the_queue_script_passes_over_the_cells_its_dry_run_finds_finished(tmp_path: Path) -> None:
    """scripts/sweep_queue.sh asks fedlt-sweep once (--dry-run) which cells are finished and calls it only for
    the others, in the queue's order; the plan it reads is the real dry run's, with one cell finished."""
    spec = small_spec(rows="setting", grid={"setting": {"plain": {"method": "fedavg"},
                                                        "prox": {"method": "fedprox", "prox-mu": 0.01}}},
                      seeds=[0, 1], **{"row-overrides": {}})
    finished = sweep_grid.parse_only(["setting=plain", "seed=0"], spec)
    sweep.run_sweep(spec, tmp_path / "out", runner=fake_runner(), only=finished, log=quiet(), write_report=False)
    plan: list[str] = []
    sweep.run_sweep(spec, tmp_path / "out", dry_run=True, log=quiet(plan), write_report=False)
    assert any(line.endswith(" plain__seed-0: finished, skip") for line in plan)

    app = tmp_path / "app"
    (app / "scripts").mkdir(parents=True)
    (app / ".venv" / "bin").mkdir(parents=True)
    script = app / "scripts" / "sweep_queue.sh"
    script.write_text((ROOT / "scripts" / "sweep_queue.sh").read_text())
    (tmp_path / "plan.txt").write_text("\n".join(plan) + "\n")
    stub = app / ".venv" / "bin" / "fedlt-sweep"  # records its calls; prints the plan on --dry-run
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n'
                    'case " $* " in *" --dry-run "*) cat "$PLAN" ;; esac\n')
    stub.chmod(0o755)
    queue = tmp_path / "order.queue"
    queue.write_text("# order\nprox 0\nplain 0\nplain 1\n")
    calls = tmp_path / "calls.txt"
    done = subprocess.run(["bash", str(script), "spec.yaml", str(queue)], capture_output=True, text=True,
                          env={**os.environ, "CALLS": str(calls), "PLAN": str(tmp_path / "plan.txt")})
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == [
        "spec.yaml --only setting=plain,prox --only seed=0,1 --dry-run",
        "spec.yaml --only setting=prox --only seed=0",
        "spec.yaml --only setting=plain --only seed=1",
    ]
    assert "plain seed 0" not in done.stdout and "prox seed 0" in done.stdout


def test_manifest_names_the_sweep_file_as_the_checkout_does(tmp_path: Path) -> None:
    # collect runs the report on the absolute path of the checkout's file; the committed sweep.json must still
    # name conf/sweeps/..., or a clone elsewhere would look for the file in the clone that wrote it
    absolute = sweep_grid.load_spec(ROOT / "conf" / "sweeps" / "cpu-fmnist-ir100.yaml")
    assert sweep.sweep_manifest(absolute, [])["source"] == "conf/sweeps/cpu-fmnist-ir100.yaml"
    outside = tmp_path / "mine.yaml"
    outside.write_text((ROOT / "conf" / "sweeps" / "cpu-fmnist-ir100.yaml").read_text())
    assert sweep.sweep_manifest(sweep_grid.load_spec(outside), [])["source"] == str(outside)
    for manifest in (ROOT / "results").glob("*/sweep.json"):
        assert not Path(json.loads(manifest.read_text())["source"]).is_absolute(), manifest


def test_cpu_protocol_is_the_briefed_grid() -> None:
    spec = sweep_grid.load_spec(ROOT / "conf" / "sweeps" / "cpu-fmnist-ir100.yaml")
    cells = sweep_grid.expand(spec)
    assert len(cells) == 21
    assert {c.coords["method"] for c in cells} == {
        "fedavg", "fedprox", "focal", "ratio-loss", "climb", "creff", "redgrape"}
    for c in cells:
        cfg = c.run_config
        assert (cfg["dataset"], cfg["imbalance-ratio"], cfg["dirichlet-alpha"]) == ("fmnist", 100.0, 1.0)
        assert c.num_clients == 10 and cfg["clients-per-round"] == 0 and c.gpus == 0.0
        assert cfg["prox-mu"] == (0.01 if cfg["method"] == "fedprox" else 0.0)


def test_run_config_text_parses_back_in_flower() -> None:
    from flwr.common.config import parse_config_args

    spec = small_spec(base={"preset": "cifar10-lt", "minority-classes": "1,2", "num-server-rounds": 2})
    for cell in sweep_grid.expand(spec)[:4]:
        overrides = {**cell.overrides, "output-dir": "/tmp/a b/out", "run-name": "x"}
        parsed = parse_config_args([sweep_grid.run_config_arg(overrides)])
        assert parsed == overrides
        assert all(type(parsed[k]) is type(v) for k, v in overrides.items())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"grid": {"methd": ["fedavg"]}}, "unknown key 'methd'"),
        ({"grid": {"method": ["fedavg", "fedavgg"]}, "row-overrides": {}}, "method: must be one of"),
        ({"base": {"dirichlet-alpha": -1.0}}, "dirichlet-alpha: must be > 0"),
        ({"base": {"num-server-rounds": "ten"}}, "num-server-rounds: expected int"),
        ({"seedz": [0]}, "unknown sweep key(s) seedz"),
        ({"rows": "imbalance-ratio2"}, "rows:"),
        ({"row-overrides": {"fedprocs": {"prox-mu": 0.01}}}, "'fedprocs' is not a value"),
        ({"row-overrides": {}}, "prox-mu: method 'fedprox' needs prox-mu > 0"),
        ({"base": {"seed": 3}}, "top-level 'seeds'"),
        ({"base": {"preset": "fmnist-ltt"}}, "no preset 'fmnist-ltt'"),
        ({"base": {"clients-per-round": 5}}, "clients-per-round 5 is more than num-clients 3"),
        ({"ablation": "lambda"}, "ablation:"),
        ({"grid": {"dataset": {"a": {"preset": "fmnist-lt"}}}}, "bundle axis"),
        ({"exclude": [{"method": "x"}]}, "'x' is not a value"),
    ],
)
def test_a_typo_fails_before_anything_runs(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    calls: list[str] = []
    with pytest.raises(SweepError) as err:
        sweep.run_sweep(small_spec(**changes), tmp_path, runner=fake_runner(calls), log=quiet())
    assert message in str(err.value)
    assert calls == [] and not any(tmp_path.iterdir())


def test_load_spec_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "my-sweep.yaml"
    path.write_text("grid:\n  method: [fedavg, focal]\nseeds: [0]\n")
    spec = sweep_grid.load_spec(path)
    assert spec.name == "my-sweep" and spec.rows == ("method",) and len(sweep_grid.expand(spec)) == 2
    path.write_text("grid: [\n")
    with pytest.raises(SweepError, match="not valid YAML"):
        sweep_grid.load_spec(path)


def test_only_and_set(tmp_path: Path) -> None:
    spec = sweep_grid.with_settings(small_spec(), ["data-dir=/data", "num-server-rounds=2"])
    cells = sweep_grid.expand(spec)
    assert all(c.run_config["data-dir"] == "/data" and c.run_config["num-server-rounds"] == 2 for c in cells)
    only = sweep_grid.parse_only(["method=fedavg,redgrape", "imbalance-ratio=100", "seed=1"], spec)
    calls: list[str] = []
    outcome = sweep.run_sweep(spec, tmp_path, runner=fake_runner(calls), only=only, log=quiet(), write_report=False)
    assert calls == ["method-fedavg__imbalance-ratio-100__seed-1", "method-redgrape__imbalance-ratio-100__seed-1"]
    assert len(outcome.not_selected) == 16
    with pytest.raises(SweepError, match="values of method"):
        sweep_grid.parse_only(["method=fedav"], spec)
    with pytest.raises(SweepError, match="unknown key"):
        sweep_grid.with_settings(spec, ["dat-dir=/data"])


# --------------------------------------------------------------- running


def test_runner_gets_the_cell_and_its_outputs_land_in_runs(tmp_path: Path) -> None:
    seen = []

    def runner(run: sweep.CellRun) -> int:
        seen.append(run)
        return fake_runner()(run)

    sweep.run_sweep(small_spec(seeds=[0]), tmp_path, runner=runner, log=quiet(), write_report=False)
    run = seen[0]
    assert run.run_dir == tmp_path.resolve() / "small" / "runs" / run.cell.name
    assert run.run_config["output-dir"] == str(run.run_dir.parent) and run.run_config["run-name"] == run.cell.name
    assert f"run-name='{run.cell.name}'" in run.run_config_arg
    assert (run.num_clients, run.cpus, run.gpus, run.app_dir) == (3, 1, 0.0, sweep.APP_DIR)
    manifest = json.loads((tmp_path / "small" / "sweep.json").read_text())
    assert [c["name"] for c in manifest["cells"]] == [c.name for c in sweep_grid.expand(small_spec(seeds=[0]))]
    assert manifest["rows"] == ["method"] and manifest["columns"] == ["imbalance-ratio"]


def test_a_killed_sweep_resumes_and_reruns_the_partial_cell(tmp_path: Path) -> None:
    spec = small_spec()
    names = [c.name for c in sweep_grid.expand(spec)]
    with pytest.raises(KeyboardInterrupt):  # killed while its third cell runs
        sweep.run_sweep(spec, tmp_path, runner=fake_runner(kill=lambda n: n == names[2]), log=quiet())
    runs = tmp_path / "small" / "runs"
    assert run_status(runs / names[0]) == "completed" and run_status(runs / names[1]) == "completed"
    assert (runs / names[2] / "metrics.jsonl").exists() and run_status(runs / names[2]) is None

    calls: list[str] = []
    lines: list[str] = []
    outcome = sweep.run_sweep(spec, tmp_path, runner=fake_runner(calls), log=quiet(lines), write_report=False)
    assert calls == [f"{names[2]}-retry1", *names[3:]]  # finished cells skipped, the partial one re-run
    assert outcome.skipped == names[:2] and outcome.ok
    assert any(f"re-running as {names[2]}-retry1" in line for line in lines)
    assert sweep_results.completed_attempt(runs, names[2]) == runs / f"{names[2]}-retry1"

    calls.clear()
    outcome = sweep.run_sweep(spec, tmp_path, runner=fake_runner(calls), log=quiet(), write_report=False)
    assert calls == [] and len(outcome.skipped) == len(names)
    res = sweep_results.load(tmp_path / "small")
    assert set(res.runs) == set(names) and res.runs[names[2]].dir.name == f"{names[2]}-retry1"


@pytest.mark.parametrize("moon_persisted", [True, False])
def test_an_interrupted_cell_with_a_checkpoint_continues_in_its_own_folder(tmp_path: Path,
                                                                          moon_persisted: bool) -> None:
    """A cell killed after a checkpoint resumes from it (same folder, resume-from) when its method keeps no client
    state, or its clients wrote theirs to the run folder (persist-client-state); a MOON cell whose clients kept
    their previous models in memory only (persist-client-state false, or a run from before the key:
    test_collect) re-runs from round 1 instead, as its resume would not be the uninterrupted run."""
    spec = small_spec(grid={"method": ["fedavg", "moon"], "imbalance-ratio": [10.0]}, seeds=[0],
                      **{"row-overrides": {}})
    names = [c.name for c in sweep_grid.expand(spec)]
    runs = tmp_path / "small" / "runs"
    for cell in sweep_grid.expand(spec):  # both killed at round 5, after a checkpoint
        config = {**cell.run_config, "output-dir": str(runs), "run-name": cell.name}
        if cell.run_config["method"] == "moon" and not moon_persisted:
            config["persist-client-state"] = False
        write_run(runs / cell.name, config, rounds=5, finish=False)
        (runs / cell.name / "checkpoint.pt").write_bytes(b"round 5")
    seen: list[sweep.CellRun] = []
    lines: list[str] = []

    def runner(run: sweep.CellRun) -> int:
        seen.append(run)
        return fake_runner()(run) if "resume-from" not in run.run_config else _finish(run)

    def _finish(run: sweep.CellRun) -> int:  # the app continues in the checkpoint's folder and completes there
        write_run(run.run_dir, {k: v for k, v in run.run_config.items() if k != "resume-from"})
        return 0

    outcome = sweep.run_sweep(spec, tmp_path, runner=runner, log=quiet(lines), write_report=False)
    fedavg, moon = seen
    assert fedavg.run_name == names[0] and fedavg.run_config["resume-from"] == str(runs.resolve() / names[0])
    assert f"resume-from='{runs.resolve() / names[0]}'" in fedavg.run_config_arg
    assert any(f"continuing {names[0]} from its checkpoint" in line for line in lines)
    assert outcome.ok and sweep_results.completed_attempt(runs, names[0]) == runs / names[0]
    if moon_persisted:
        assert moon.run_name == names[1] and moon.run_config["resume-from"] == str(runs.resolve() / names[1])
        assert sweep_results.completed_attempt(runs, names[1]) == runs / names[1]
    else:
        assert moon.run_name == f"{names[1]}-retry1" and "resume-from" not in moon.run_config
        assert sweep_results.completed_attempt(runs, names[1]) == runs / f"{names[1]}-retry1"
    calls: list[str] = []
    sweep.run_sweep(spec, tmp_path, runner=fake_runner(calls), log=quiet(), write_report=False)
    assert calls == []  # the continued run counts as the cell's (resume-from is not part of its identity)


def test_a_failed_cell_is_reported_and_retried(tmp_path: Path) -> None:
    spec = small_spec(seeds=[0])
    names = [c.name for c in sweep_grid.expand(spec)]

    def fails(name: str) -> bool:
        return name == names[1]

    def failing_runner(run: sweep.CellRun) -> int:
        if fails(run.cell.name):  # the app ran and failed: it left a summary with status failed
            config = {**run.cell.run_config, "output-dir": str(run.run_dir.parent), "run-name": run.run_name}
            run_dir = write_run(run.run_dir, config, finish=False)
            (run_dir / "summary.json").write_text(json.dumps({"status": "failed"}))
            return 1
        return fake_runner()(run)

    outcome = sweep.run_sweep(spec, tmp_path, runner=failing_runner, log=quiet(), write_report=False)
    assert outcome.failed == [names[1]] and not outcome.ok and len(outcome.ran) == len(names) - 1
    assert sweep_results.load(tmp_path / "small").status[names[1]] == "failed"
    calls: list[str] = []
    outcome = sweep.run_sweep(spec, tmp_path, runner=fake_runner(calls), log=quiet(), write_report=False)
    assert calls == [f"{names[1]}-retry1"] and outcome.ok


def test_the_sweep_stops_after_failures_in_a_row(tmp_path: Path) -> None:
    calls: list[str] = []
    outcome = sweep.run_sweep(small_spec(), tmp_path, runner=fake_runner(calls, fail=lambda n: True),
                              max_failures_in_a_row=2, log=quiet(), write_report=False)
    assert len(calls) == 2 and outcome.stopped and not outcome.ok


def test_a_changed_sweep_file_does_not_reuse_old_runs(tmp_path: Path) -> None:
    sweep.run_sweep(small_spec(seeds=[0]), tmp_path, runner=fake_runner(), log=quiet(), write_report=False)
    changed = small_spec(seeds=[0], base={"num-server-rounds": 20, "samples-per-class": 50})
    with pytest.raises(SweepError, match="num-server-rounds: ran 12, sweep says 20"):
        sweep.run_sweep(changed, tmp_path, runner=fake_runner(), log=quiet())
    # keys that do not change results (data-dir, device, ...) may change
    moved = sweep_grid.with_settings(small_spec(seeds=[0]), ["data-dir=/elsewhere"])
    calls: list[str] = []
    sweep.run_sweep(moved, tmp_path, runner=fake_runner(calls), log=quiet(), write_report=False)
    assert calls == []


def test_progress_line_per_cell(tmp_path: Path) -> None:
    now = [0.0]

    def runner(run: sweep.CellRun) -> int:
        now[0] += 100.0  # every cell takes 100 s
        return fake_runner()(run)

    lines: list[str] = []
    spec = small_spec(grid={"method": ["fedavg", "focal"], "imbalance-ratio": [10.0, 100.0]}, **{"row-overrides": {}})
    sweep.run_sweep(spec, tmp_path, runner=runner, log=quiet(lines), clock=lambda: now[0], write_report=False)
    starts = [line for line in lines if "elapsed" in line]
    assert starts[0] == "[sweep] cell 1/12 method-fedavg__imbalance-ratio-10__seed-0: elapsed 0s, " \
                        "estimated remaining unknown"
    assert starts[1] == "[sweep] cell 2/12 method-fedavg__imbalance-ratio-10__seed-1: elapsed 1m40s, " \
                        "estimated remaining 18m20s"
    assert starts[11].startswith("[sweep] cell 12/12 ")
    assert starts[11].endswith("elapsed 18m20s, estimated remaining 1m40s")
    assert sweep.duration(3 * 3600 + 125) == "3h02m"
    log = [json.loads(line) for line in (tmp_path / "small" / "cells.jsonl").read_text().splitlines()]
    assert len(log) == 12 and log[0]["seconds"] == 100.0 and log[0]["status"] == "completed"
    # a later invocation estimates from the wall time of the cells run before
    lines.clear()
    more = small_spec(grid={"method": ["fedavg", "focal"], "imbalance-ratio": [10.0, 100.0]}, seeds=[0, 1, 2, 3],
                      **{"row-overrides": {}})
    sweep.run_sweep(more, tmp_path, runner=runner, log=quiet(lines), clock=lambda: now[0], write_report=False)
    assert next(line for line in lines if "elapsed" in line).endswith("elapsed 0s, estimated remaining 6m40s")


def test_launch_runner_runs_the_app_with_the_sweeps_own_flower_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlt_app import launch

    got = {}

    def fake_launch(app_dir, run_config, num_clients, cpus, gpus, timeout):  # type: ignore[no-untyped-def]
        got.update(app_dir=app_dir, run_config=run_config, num_clients=num_clients, cpus=cpus, gpus=gpus,
                   timeout=timeout, home=os.environ.get("FLWR_HOME"))
        return 3

    monkeypatch.setattr(launch, "run", fake_launch)
    monkeypatch.setenv("FLWR_HOME", "/somewhere/else")
    outcome = sweep.run_sweep(small_spec(seeds=[0]), tmp_path, only={"method": {"fedavg"}, "imbalance-ratio": {"10"}},
                              log=quiet(), write_report=False, timeout=60.0)
    assert outcome.failed == ["method-fedavg__imbalance-ratio-10__seed-0"]
    assert got["home"] == str(tmp_path.resolve() / "small" / "flwr-home")
    assert os.environ["FLWR_HOME"] == "/somewhere/else"
    assert got["num_clients"] == 3 and got["cpus"] == 1 and got["gpus"] == 0.0 and got["timeout"] == 60.0
    assert "method='fedavg'" in got["run_config"] and "run-name='method-fedavg__imbalance-ratio-10__seed-0'" in got[
        "run_config"]


def test_gpus_without_a_gpu_fail_fast(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SweepError, match="--gpus-per-client 0"):
        sweep.run_sweep(small_spec(**{"gpus-per-client": 0.25}), tmp_path, runner=fake_runner(), log=quiet())
    calls: list[str] = []
    sweep.run_sweep(small_spec(**{"gpus-per-client": 0.25}, seeds=[0]), tmp_path, runner=fake_runner(calls), gpus=0.0,
                    log=quiet(), write_report=False)
    assert len(calls) == 6


def test_cli_dry_run_writes_nothing_and_report_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cli.yaml"
    path.write_text("name: cli\nbase: {num-server-rounds: 2}\nnum-clients: 2\ngrid:\n  method: [fedavg]\nseeds: [0]\n")
    assert sweep.main([str(path), "--dry-run", "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "cell 1/1 method-fedavg__seed-0: run" in out
    assert "--run-config \"method='fedavg' num-server-rounds=2\"" in out
    assert not (tmp_path / "out").exists()
    assert sweep.main([str(tmp_path / "missing.yaml")]) == 2
    sweep.run_sweep(sweep_grid.load_spec(path), tmp_path / "out", runner=fake_runner(), log=quiet(), write_report=False)
    assert sweep.main([str(path), "--report-only", "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "cli" / "table.md").exists()


# ----------------------------------------------------------------- report


@pytest.fixture(scope="module")
def fixture_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small finished sweep: 3 methods x IR 10/100 x 3 seeds, 12 rounds each, one seed missing."""
    out = tmp_path_factory.mktemp("results")
    spec = small_spec(ablation="imbalance-ratio")
    missing = "method-redgrape__imbalance-ratio-100__seed-2"
    sweep.run_sweep(spec, out, runner=fake_runner(fail=lambda n: n == missing), log=quiet())
    return out / "small"


def expected_entry(sweep_dir: Path, method: str, ir: str, metric: str) -> str:
    """Recompute a table entry from the fixture's metrics.jsonl files, independently of fedlt_app.report."""
    values = []
    for seed in (0, 1, 2):
        path = sweep_dir / "runs" / f"method-{method}__imbalance-ratio-{ir}__seed-{seed}" / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        last = [r[metric] for r in rows[-10:]]
        if any(v is None for v in last):
            return "n/a"
        values.append(100 * sum(last) / len(last))
    text = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    return text if len(values) == 3 else f"{text} ({len(values)}/3 seeds)"


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize(
    ("stem", "metric"),
    [("table", "accuracy"), ("table-tail", "tail_accuracy"), ("table-many", "many_shot_accuracy"),
     ("table-medium", "medium_shot_accuracy"), ("table-few", "few_shot_accuracy")],
)
def test_table_numbers_are_last10_mean_and_std_over_seeds(fixture_sweep: Path, stem: str, metric: str) -> None:
    lines = read_csv(fixture_sweep / f"{stem}.csv")
    assert lines[0] == ["method", "IR=10", "IR=100"]
    assert [line[0] for line in lines[1:]] == ["FedAvg+CE", "FedProx", "RedGrape"]
    for line, method in zip(lines[1:], ["fedavg", "fedprox", "redgrape"], strict=True):
        assert line[1:] == [expected_entry(fixture_sweep, method, ir, metric) for ir in ("10", "100")]
    assert lines[3][2].endswith("(2/3 seeds)")
    if metric == "few_shot_accuracy":  # the fake runs have no few-shot class at IR 10
        assert [line[1] for line in lines[1:]] == ["n/a"] * 3


def test_table_md_has_every_metric_and_the_unfinished_cell(fixture_sweep: Path) -> None:
    text = (fixture_sweep / "table.md").read_text()
    for metric in report.METRICS:
        assert f"## {metric.title}" in text
    assert "| method | IR=10 | IR=100 |" in text
    assert "ddof = 1" in text and "last 10 rounds" in text
    assert "`method-redgrape__imbalance-ratio-100__seed-2`: not run" in text
    fedavg = next(line for line in text.splitlines() if line.startswith("| FedAvg+CE |"))
    assert expected_entry(fixture_sweep, "fedavg", "10", "accuracy") in fedavg


def test_stats_helpers() -> None:
    assert sweep_results.mean_std([0.5, 0.7]) == pytest.approx((0.6, math.sqrt(0.02)))
    assert sweep_results.mean_std([0.5]) == (0.5, None)
    assert report.format_stat(sweep_results.Stat(0.95731, None, 1, 1)) == "95.73"
    assert report.format_stat(sweep_results.Stat(None, None, 0, 3)) == "—"
    assert sweep_results.last_mean([{"a": v} for v in range(20)], "a") == pytest.approx(14.5)
    assert sweep_results.last_mean([{"a": None}], "a") is None


def test_runs_csv_and_plots(fixture_sweep: Path) -> None:
    lines = read_csv(fixture_sweep / "runs.csv")
    assert lines[0][:6] == ["cell", "status", "run_dir", "method", "imbalance-ratio", "seed"]
    assert len(lines) == 1 + 18
    plots = sorted(p.name for p in (fixture_sweep / "plots").iterdir())
    assert plots == sorted([
        "accuracy-imbalance-ratio-10.png", "accuracy-imbalance-ratio-100.png",
        "per-class-imbalance-ratio-10.png", "per-class-imbalance-ratio-100.png",
        "ablation-imbalance-ratio-all.png", "ablation-imbalance-ratio-final-all.png",
    ])
    assert all((fixture_sweep / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)
    res = sweep_results.load(fixture_sweep)
    curves = report_plots.curves(res, ["imbalance-ratio"], ["10"], ["method"])
    assert sorted(curves) == [("fedavg",), ("fedprox",), ("redgrape",)]
    xs, ys = curves[("fedavg",)]
    assert xs == list(range(1, 13))
    firsts = [json.loads((fixture_sweep / "runs" / f"method-fedavg__imbalance-ratio-10__seed-{s}" / "metrics.jsonl")
                         .read_text().splitlines()[0])["accuracy"] for s in (0, 1, 2)]
    assert ys[0] == pytest.approx(sum(firsts) / 3)


def test_load_refuses_a_folder_without_a_sweep(tmp_path: Path) -> None:
    with pytest.raises(sweep_results.ReportError, match="no sweep results"):
        sweep_results.load(tmp_path)


def test_notebook_renders_a_results_folder(fixture_sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = ROOT / "notebooks" / "analyze_results.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    monkeypatch.setenv("FEDLT_RESULTS", str(fixture_sweep))
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(notebook.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "## Balanced accuracy" in markdown
    assert expected_entry(fixture_sweep, "fedprox", "100", "accuracy") in markdown
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 6


# ------------------------------------------------------------ paired differences


def last10(sweep_dir: Path, cell: str, metric: str) -> float | None:
    path = sweep_dir / "runs" / cell / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()][-10:]
    return 100 * sum(r[metric] for r in rows) / len(rows)


@pytest.fixture(scope="module")
def paired_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("paired")
    spec = small_spec(name="paired", paired={"key": "method", "reference": ["fedavg", "redgrape"]})
    missing = "method-redgrape__imbalance-ratio-100__seed-2"
    sweep.run_sweep(spec, out, runner=fake_runner(fail=lambda n: n == missing), log=quiet())
    return out / "paired"


@pytest.mark.parametrize(("stem", "metric"), [("table-paired", "accuracy"), ("table-tail-paired", "tail_accuracy")])
def test_paired_differences_to_the_reference_per_seed(paired_sweep: Path, stem: str, metric: str) -> None:
    lines = read_csv(paired_sweep / f"{stem}.csv")
    assert lines[0] == ["method", "IR=10", "IR=100"]
    assert [line[0] for line in lines[1:]] == ["FedProx", "RedGrape"]  # no row for the reference itself
    for line, method in zip(lines[1:], ["fedprox", "redgrape"], strict=True):
        for entry, ir in zip(line[1:], ("10", "100"), strict=True):
            diffs = []
            for seed in (0, 1, 2):
                mine = last10(paired_sweep, f"method-{method}__imbalance-ratio-{ir}__seed-{seed}", metric)
                ref = last10(paired_sweep, f"method-fedavg__imbalance-ratio-{ir}__seed-{seed}", metric)
                if mine is not None and ref is not None:
                    diffs.append(mine - ref)
            mean = statistics.mean(diffs)
            agree = sum((d > 0) if mean >= 0 else (d < 0) for d in diffs)
            sign = ">" if mean >= 0 else "<"
            expected = f"{mean:+.2f} ± {statistics.stdev(diffs):.2f} ({agree}/{len(diffs)} {sign} 0)"
            if abs(mean) < statistics.stdev(diffs):
                expected += " ‡"  # smaller than its spread: more seeds needed
            if len(diffs) < 3:
                expected += f" ({len(diffs)}/3 seeds paired)"
            assert entry == expected
    assert lines[2][2].endswith("(2/3 seeds paired)")
    text = (paired_sweep / "table.md").read_text()
    assert "## Paired differences to FedAvg+CE" in text
    assert "‡: the mean difference is smaller than its spread" in text


def test_per_seed_paired_differences_show_what_the_spread_is_made_of(paired_sweep: Path) -> None:
    """Per method and seed: the balanced paired difference to FedAvg on that seed; blank where a run is missing."""
    lines = read_csv(paired_sweep / "table-paired-per-seed.csv")
    assert lines[0] == ["setting", "method", "seed 0", "seed 1", "seed 2"]
    assert [line[:2] for line in lines[1:]] == [
        ["IR=10", "FedProx"], ["IR=10", "RedGrape"], ["IR=100", "FedProx"], ["IR=100", "RedGrape"]]
    for line in lines[1:]:
        ir, method = line[0].removeprefix("IR="), {"FedProx": "fedprox", "RedGrape": "redgrape"}[line[1]]
        for seed, entry in enumerate(line[2:]):
            mine = last10(paired_sweep, f"method-{method}__imbalance-ratio-{ir}__seed-{seed}", "accuracy")
            ref = last10(paired_sweep, f"method-fedavg__imbalance-ratio-{ir}__seed-{seed}", "accuracy")
            assert entry == ("" if mine is None or ref is None else f"{mine - ref:+.2f}")
    assert lines[4][4] == ""  # RedGrape at IR 100, seed 2: its run failed
    assert report.markdown_table(lines) in (paired_sweep / "table.md").read_text()


def class_last10(sweep_dir: Path, cell: str) -> list[float] | None:
    path = sweep_dir / "runs" / cell / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line)["per_class_accuracy"] for line in path.read_text().splitlines()][-10:]
    return [100 * statistics.mean(values) for values in zip(*rows, strict=True)]


def test_per_class_paired_differences_say_where_a_gain_comes_from(paired_sweep: Path) -> None:
    """Per method and class: that class's last-10 accuracy minus FedAvg's on the same seed, mean ± std over the
    paired seeds; a seed without both runs does not pair ('2/3')."""
    lines = read_csv(paired_sweep / "table-per-class-paired.csv")
    assert lines[0] == ["setting", "method", "seeds", *map(str, range(10))]
    assert [line[:3] for line in lines[1:]] == [
        ["IR=10", "FedProx", "3"], ["IR=10", "RedGrape", "3"], ["IR=100", "FedProx", "3"],
        ["IR=100", "RedGrape", "2/3"]]
    for line in lines[1:]:
        ir, method = line[0].removeprefix("IR="), {"FedProx": "fedprox", "RedGrape": "redgrape"}[line[1]]
        diffs = []
        for seed in (0, 1, 2):
            mine = class_last10(paired_sweep, f"method-{method}__imbalance-ratio-{ir}__seed-{seed}")
            ref = class_last10(paired_sweep, f"method-fedavg__imbalance-ratio-{ir}__seed-{seed}")
            if mine is not None and ref is not None:
                diffs.append([a - b for a, b in zip(mine, ref, strict=True)])
        for entry, values in zip(line[3:], zip(*diffs, strict=True), strict=True):
            mean, std = statistics.mean(values), statistics.stdev(values)
            assert entry == f"{mean:+.1f} ± {std:.1f}" + (" ‡" if abs(mean) < std else "")
    text = (paired_sweep / "table.md").read_text()
    assert "## Per-class paired differences to FedAvg+CE" in text
    assert report.markdown_table(lines) in text


def test_per_class_paired_table_heads_classes_with_their_training_images(fixture_sweep: Path) -> None:
    res = sweep_results.load(fixture_sweep)
    res.meta["paired"] = {"key": "method", "references": ["fedavg"]}
    single = sweep_results.SweepResults(res.root, res.meta | {"cells": res.cells_at((["imbalance-ratio"], ["10"]))},
                                        res.runs, res.status)
    lines = report.per_class_paired_table(single)
    assert lines[0][:4] == ["method", "seeds", "0 (600)", "1 (359)"] and lines[0][-1] == "9 (6)"
    assert [line[0] for line in lines[1:]] == ["FedProx", "RedGrape"]
    assert report.per_class_paired_table(sweep_results.load(fixture_sweep)) == [[]]  # no reference: no table


def test_a_second_reference_gets_tables_of_its_own(paired_sweep: Path) -> None:
    """``reference: [fedavg, redgrape]``: besides the main tables, every other method's per-seed difference to
    RedGrape (``table-paired-redgrape.csv``, a table.md section); seeds where either run is missing do not pair."""
    lines = read_csv(paired_sweep / "table-paired-redgrape.csv")
    assert [line[0] for line in lines[1:]] == ["FedAvg+CE", "FedProx"]  # no row for RedGrape itself
    for line, method in zip(lines[1:], ["fedavg", "fedprox"], strict=True):
        for entry, ir in zip(line[1:], ("10", "100"), strict=True):
            diffs = [last10(paired_sweep, f"method-{method}__imbalance-ratio-{ir}__seed-{seed}", "accuracy")
                     - last10(paired_sweep, f"method-redgrape__imbalance-ratio-{ir}__seed-{seed}", "accuracy")
                     for seed in (0, 1, 2)
                     if (paired_sweep / "runs" / f"method-redgrape__imbalance-ratio-{ir}__seed-{seed}"
                         / "metrics.jsonl").exists()]
            assert entry.startswith(f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} (")
            assert entry.endswith("(2/3 seeds paired)") == (ir == "100")
    assert (paired_sweep / "table-tail-paired-redgrape.csv").is_file()
    text = (paired_sweep / "table.md").read_text()
    assert text.index("## Paired differences to FedAvg+CE") < text.index("## Paired differences to RedGrape")
    assert json.loads((paired_sweep / "sweep.json").read_text())["paired"] == {
        "key": "method", "references": ["fedavg", "redgrape"]}


def test_the_summary_ranks_fully_run_settings_by_balanced_accuracy(paired_sweep: Path) -> None:
    """``table-summary.csv`` (and table.md's first section): per column block, the methods whose every seed
    finished ranked by their balanced mean, then those missing seeds; each entry is the metric tables' mean and
    std (recomputed here from the runs) and the paired tables' difference; the reference's own Δ says so."""
    lines = read_csv(paired_sweep / "table-summary.csv")
    assert lines[0] == ["setting", "method", "seeds", "balanced", "tail",
                        "Δ balanced vs FedAvg+CE (paired)", "Δ tail vs FedAvg+CE (paired)"]
    labels = {"fedavg": "FedAvg+CE", "fedprox": "FedProx", "redgrape": "RedGrape"}
    paired = {metric: {(line[0], column): entry
                       for line in read_csv(paired_sweep / f"{stem}.csv")[1:]
                       for column, entry in zip(("IR=10", "IR=100"), line[1:], strict=True)}
              for stem, metric in (("table-paired", "accuracy"), ("table-tail-paired", "tail_accuracy"))}
    assert [line[0] for line in lines[1:]] == ["IR=10"] * 3 + ["IR=100"] * 3
    for column, ir in (("IR=10", "10"), ("IR=100", "100")):
        block = [line for line in lines[1:] if line[0] == column]
        values = {}
        for method, label in labels.items():
            runs = [last10(paired_sweep, f"method-{method}__imbalance-ratio-{ir}__seed-{seed}", "accuracy")
                    for seed in (0, 1, 2)]
            values[label] = [v for v in runs if v is not None]
        complete = sorted((label for label in labels.values() if len(values[label]) == 3),
                          key=lambda label: -statistics.mean(values[label]))
        partial = [label for label in labels.values() if len(values[label]) < 3]
        assert [line[1] for line in block] == complete + partial
        for line in block:
            balanced = values[line[1]]
            assert line[2] == (str(len(balanced)) if len(balanced) == 3 else f"{len(balanced)}/3")
            assert line[3] == f"{statistics.mean(balanced):.2f} ± {statistics.stdev(balanced):.2f}"
            if line[1] == "FedAvg+CE":
                assert line[5:] == ["reference", "reference"]
            else:
                assert line[5] == paired["accuracy"][(line[1], column)]
                assert line[6] == paired["tail_accuracy"][(line[1], column)]
    assert lines[-1][1:3] == ["RedGrape", "2/3"]  # its missing seed puts it after the fully run ones
    text = (paired_sweep / "table.md").read_text()
    assert text.index("## Summary") < text.index("## Balanced accuracy")


def test_embed_summaries_fills_only_the_marked_block(paired_sweep: Path) -> None:
    text = "before\n<!-- fedlt-summary: paired -->\nstale line\n<!-- /fedlt-summary -->\nafter\n"
    filled = report.embed_summaries(text, lambda sweep: paired_sweep.parent / sweep)
    table = report.markdown_table(report.summary_table(sweep_results.load(paired_sweep)))
    assert filled == f"before\n<!-- fedlt-summary: paired -->\n{table}\n<!-- /fedlt-summary -->\nafter\n"
    assert report.embed_summaries(filled, lambda sweep: paired_sweep.parent / sweep) == filled
    with pytest.raises(sweep_results.ReportError, match="no '<!-- fedlt-summary"):
        report.embed_summaries("a README without the block\n", lambda sweep: paired_sweep)


def test_embed_summaries_command_rewrites_the_document(paired_sweep: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    document = paired_sweep.parent / "README.md"
    document.write_text("<!-- fedlt-summary: paired -->\n<!-- /fedlt-summary -->\n")
    assert report.main(["--embed-summaries", str(document)]) == 0
    table = report.summary_markdown(sweep_results.load(paired_sweep))
    assert document.read_text() == f"<!-- fedlt-summary: paired -->\n{table}\n<!-- /fedlt-summary -->\n"
    assert report.main(["--embed-summaries", str(tmp_path / "absent.md")]) == 2
    (tmp_path / "plain.md").write_text("no block\n")
    assert report.main(["--embed-summaries", str(tmp_path / "plain.md")]) == 2
    assert "no '<!-- fedlt-summary" in capsys.readouterr().err
    assert (tmp_path / "plain.md").read_text() == "no block\n"


def test_readme_summary_is_the_committed_runs_table() -> None:
    """README's converged summary is regenerated from ``results/``' committed runs: a cell landing without it,
    or a hand edit, fails here."""
    text = (ROOT / "README.md").read_text()
    assert "<!-- fedlt-summary: results/converged-fmnist-ir100 -->" in text
    assert text == report.embed_summaries(text, lambda sweep: ROOT / sweep), (
        "README's summary is stale: python -m fedlt_app.report --embed-summaries README.md")


SHIRT = 6  # Fashion-MNIST's class the per-seed table quotes (the one every leading method's gain is mostly in)


def _signed(x: float) -> str:
    return ("+" if x >= 0 else "\u2212") + f"{abs(100 * x):.2f}"


def _per_seed_row(run: sweep_results.Run, reference: sweep_results.Run | None) -> tuple[str, ...]:
    """A converged run's README row after its label, as the runs give it: seed, balanced, tail, many- and
    medium-shot accuracy (last-10 means), the differences to FedAvg+CE's run of the same seed ('—' for FedAvg's
    own; differences of the unrounded means), shirt's last-10 accuracy, the last-10 drift and the plateau round."""
    rounds = run.rounds

    def mean(metric: str) -> str:
        return f"{100 * sweep_results.last_mean(rounds, metric):.2f}"

    def both(value: Callable[[str], str]) -> str:
        return " / ".join(value(m) for m in ("accuracy", "tail_accuracy"))

    if reference is None:
        deltas = ("\u2014", "\u2014")
    else:
        deltas = tuple(_signed(sweep_results.last_mean(rounds, m) - sweep_results.last_mean(reference.rounds, m))
                       for m in ("accuracy", "tail_accuracy"))
    shirt = sweep_results.last_class_means(rounds)[SHIRT]
    return (str(run.cell["seed"]), mean("accuracy"), mean("tail_accuracy"), mean("many_shot_accuracy"),
            mean("medium_shot_accuracy"), *deltas, f"{100 * shirt:.1f}",
            both(lambda m: _signed(sweep_results.last10_drift(rounds, m))),
            both(lambda m: str(sweep_results.plateau_round(rounds, m) or "not reached")))


def test_readme_per_seed_rows_are_the_committed_runs() -> None:
    """README's per-seed table of the converged sweep, written as cells land: one row per completed run, every
    column after the label the run's (and its FedAvg+CE partner's) figures, and the 'In progress' count the
    number of completed cells."""
    res = sweep_results.load(ROOT / "results" / "converged-fmnist-ir100")
    fedavg = {run.cell["seed"]: run for run in res.runs.values() if run.cell["coords"]["setting"] == "fedavg"}
    runs = collections.Counter(
        _per_seed_row(run, None if run.cell["coords"]["setting"] == "fedavg" else fedavg[run.cell["seed"]])
        for run in res.runs.values())
    text = (ROOT / "README.md").read_text()
    start = text.index("| setting | seed | balanced | tail | many-shot | medium-shot | \u0394 balanced | \u0394 tail | "
                       "shirt (278 imgs) | drift (bal / tail) | plateau N (bal / tail) |")
    lines = text[start:text.index("\n\n", start)].splitlines()[2:]
    rows = collections.Counter(
        tuple(cell.strip().replace("**", "") for cell in line.strip("|").split("|")[1:]) for line in lines)
    assert rows == runs, f"rows without a run: {rows - runs}; runs without a row: {runs - rows}"
    assert f"**In progress ({len(res.runs)} of {len(res.cells)} cells)" in text


def test_a_manifest_from_before_several_references_still_pairs() -> None:
    old = sweep_results.SweepResults(Path("."), {"paired": {"key": "method", "reference": "fedavg"}}, {}, {})
    assert sweep_results.paired_references(old) == ("method", ["fedavg"])


def test_paired_needs_a_grid_key_and_one_of_its_values() -> None:
    with pytest.raises(SweepError, match="paired: 'seed' is not a grid key"):
        small_spec(paired={"key": "seed", "reference": 0})
    with pytest.raises(SweepError, match="paired: 'fedadam' is not a value of grid key 'method'"):
        small_spec(paired={"key": "method", "reference": "fedadam"})
    with pytest.raises(SweepError, match="paired: expected"):
        small_spec(paired={"key": "method"})
    with pytest.raises(SweepError, match="paired: 'fedadam' is not a value of grid key 'method'"):
        small_spec(paired={"key": "method", "reference": ["fedavg", "fedadam"]})
    with pytest.raises(SweepError, match="paired: reference: a value twice"):
        small_spec(paired={"key": "method", "reference": ["fedavg", "fedavg"]})
    with pytest.raises(SweepError, match="paired: reference: an empty list"):
        small_spec(paired={"key": "method", "reference": []})


def test_more_seeds_add_seeds_to_the_matching_cells_and_their_paired_reference(tmp_path: Path) -> None:
    more = [{"when": {"method": "fedprox"}, "seeds": [3, 4]}, {"when": {"method": "fedavg"}, "seeds": [3, 4]}]
    spec = small_spec(paired={"key": "method", "reference": "fedavg"}, **{"more-seeds": more})
    cells = sweep_grid.expand(spec)
    assert len(cells) == 3 * 2 * 3 + 2 * 2 * 2
    assert sorted({c.seed for c in cells if c.coords["method"] == "redgrape"}) == [0, 1, 2]
    assert sorted({c.seed for c in cells if c.coords["method"] == "fedprox"}) == [0, 1, 2, 3, 4]
    fedprox_4 = next(c for c in cells if c.name == "method-fedprox__imbalance-ratio-10__seed-4")
    assert fedprox_4.run_config["seed"] == 4 and fedprox_4.run_config["prox-mu"] == 0.01
    assert sweep_grid.parse_only(["seed=4"], spec) == {"seed": {"4"}}
    sweep.run_sweep(spec, tmp_path, runner=fake_runner(), log=quiet())
    res = sweep_results.load(tmp_path / "small")
    five = sweep_results.stat(res, ("fedprox",), ("10",), "accuracy")
    assert (five.n, five.planned) == (5, 5)
    assert report.format_stat(five, sweep_seeds=3).endswith(" (5 seeds)")
    assert "(seeds" not in report.format_stat(sweep_results.stat(res, ("redgrape",), ("10",), "accuracy"), 3)
    paired = sweep_results.paired_stat(res, ("fedprox",), ("10",), "accuracy")
    assert paired is not None and paired.n == 5  # seeds 3 and 4 pair with FedAvg's seeds 3 and 4
    assert "more seeds than the sweep's" in (tmp_path / "small" / "table.md").read_text()
    # the summary compares every row on the sweep's seeds; the rows with more get a table over all of theirs
    three = sweep_results.stat(res, ("fedprox",), ("10",), "accuracy", seeds=[0, 1, 2])
    assert three.n == 3 and three.values == five.values[:3]
    summary = read_csv(tmp_path / "small" / "table-summary.csv")
    fedprox = next(line for line in summary if line[:2] == ["IR=10", "FedProx"])
    assert fedprox[2:4] == ["3", report.format_spread(three)]
    assert fedprox[5] == report.format_difference(
        sweep_results.paired_stat(res, ("fedprox",), ("10",), "accuracy", seeds=[0, 1, 2]))
    extended = read_csv(tmp_path / "small" / "table-summary-more-seeds.csv")
    assert sorted(line[1] for line in extended[1:]) == ["FedAvg+CE"] * 2 + ["FedProx"] * 2  # not RedGrape
    assert next(line for line in extended if line[:2] == ["IR=10", "FedProx"])[2:4] == ["5", report.format_spread(five)]


def test_more_seeds_need_a_partner_at_the_paired_reference_and_new_seeds() -> None:
    lone = small_spec(paired={"key": "method", "reference": "fedavg"},
                      **{"more-seeds": [{"when": {"method": "fedprox"}, "seeds": [3]}]})
    with pytest.raises(SweepError, match="no partner at method=fedavg with seed 3"):
        sweep_grid.expand(lone)
    with pytest.raises(SweepError, match="repeats a seed or one of the sweep's seeds"):
        small_spec(**{"more-seeds": [{"when": {"method": "fedprox"}, "seeds": [2]}]})
    with pytest.raises(SweepError, match="more-seeds\\[0\\].when: 'fedproxx' is not a value"):
        small_spec(**{"more-seeds": [{"when": {"method": "fedproxx"}, "seeds": [3]}]})
    with pytest.raises(SweepError, match="more-seeds\\[0\\]: expected"):
        small_spec(**{"more-seeds": [{"method": "fedprox", "seeds": [3]}]})


def test_last10_drift_and_plateau_round() -> None:
    rising = [{"accuracy": min(0.9, 0.1 * r)} for r in range(1, 41)]  # climbs to 0.9 at round 9, then flat
    assert sweep_results.last10_drift(rising, "accuracy") == pytest.approx(0.0)
    assert sweep_results.last10_drift(rising[:15], "accuracy") is None  # shorter than two windows
    # last-10 mean at N (rounds N-9..N) vs N+10: equal from N = 18 (both windows flat at 0.9), one point
    # apart at N = 17 (0.89 vs 0.90), three at N = 16. Tolerances away from those steps: exactly one point
    # apart is a float-rounding coin toss (Python 3.12's sum() rounds differently from 3.11's).
    assert sweep_results.plateau_round(rising, "accuracy", tolerance=0.015) == 17
    assert sweep_results.plateau_round(rising, "accuracy", tolerance=0.005) == 18
    assert sweep_results.plateau_round(rising, "accuracy", tolerance=0.04) == 16
    wobbly = rising + [{"accuracy": 0.5}] * 10
    assert sweep_results.plateau_round(wobbly, "accuracy") is None
    assert sweep_results.last10_drift(wobbly, "accuracy") == pytest.approx(-0.4)


def test_table_says_where_its_runs_computed(tmp_path: Path) -> None:
    epyc = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "torch": "2.14.1", "cuda_device": "NVIDIA H200"}
    configs = {"a": {"server_machine": epyc, "server_device": "cpu"},  # a GPU visible, the run on the CPU
               "b": {"server_machine": epyc, "server_device": "cpu"},
               "c": {"server_machine": epyc, "server_device": "cuda"},
               "d": {}}  # a run written before server_machine was recorded
    runs = {n: sweep_results.Run({"name": n, "coords": {}}, tmp_path / n, [], c) for n, c in configs.items()}
    res = sweep_results.SweepResults(tmp_path, {"cells": []}, runs, {n: "completed" for n in runs})
    assert report.machines(res) == [("AMD EPYC (AVX2), torch 2.14.1", ["a", "b"]),
                                    ("AMD EPYC (AVX2), torch 2.14.1, GPU NVIDIA H200", ["c"]),
                                    (report.NOT_RECORDED, ["d"])]
    text = report.machines_section(res)
    assert "- AMD EPYC (AVX2), torch 2.14.1: 2 run(s): `a`, `b`" in text
    assert "paired differences include it" in text  # more than one machine: the table says what that means
    one = sweep_results.SweepResults(tmp_path, {"cells": []}, {"a": runs["a"]}, {"a": "completed"})
    assert "paired differences include it" not in report.machines_section(one)


def test_the_written_table_lists_the_machines(paired_sweep: Path) -> None:
    text = (paired_sweep / "table.md").read_text()
    assert "## Machines" in text and report.NOT_RECORDED in text  # fake runs record no machine


def test_per_class_means_are_the_tables_last_ten_round_means(fixture_sweep: Path) -> None:
    """The per-class figure shows the statistic the tables show (last-10-round mean, then mean over seeds),
    not the last round alone."""
    res = sweep_results.load(fixture_sweep)
    values = report_plots.per_class_means(res, ["10"])
    expected = []
    for seed in (0, 1, 2):
        path = fixture_sweep / "runs" / f"method-fedprox__imbalance-ratio-10__seed-{seed}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        expected.append([statistics.mean(r["per_class_accuracy"][c] for r in rows[-10:]) for c in range(10)])
    assert values[("fedprox",)] == pytest.approx([statistics.mean(v) for v in zip(*expected, strict=True)])
    last_round_mean = statistics.mean(json.loads(
        (fixture_sweep / "runs" / f"method-fedprox__imbalance-ratio-10__seed-{s}" / "metrics.jsonl")
        .read_text().splitlines()[-1])["per_class_accuracy"][0] for s in (0, 1, 2))
    assert values[("fedprox",)][0] != pytest.approx(last_round_mean)  # the fixture's accuracy rises every round
    assert sweep_results.class_counts_of(res, ["10"]) == [600, 359, 215, 129, 77, 46, 27, 16, 9, 6]


def many_methods_sweep(root: Path, methods: int, rounds: int) -> sweep_results.SweepResults:
    """A finished one-seed sweep of ``methods`` rows (FedProx at different μ, each its own row label)."""
    spec = sweep_grid.parse_spec({
        "name": "many", "base": {"num-server-rounds": rounds, "samples-per-class": 50}, "num-clients": 3,
        "rows": "prox-mu", "grid": {"method": ["fedprox"], "prox-mu": [0.001 * (i + 1) for i in range(methods)]},
        "seeds": [0],
    })
    sweep.run_sweep(spec, root, runner=fake_runner(), log=quiet())
    return sweep_results.load(root / "many")


def test_sweep_plots_stay_readable_with_many_methods(tmp_path: Path) -> None:
    """Past six rows the legend leaves the axes and per-class bars become a rows × classes map; runs of 20
    rounds or more get a panel with their last half."""
    few = many_methods_sweep(tmp_path / "few", methods=3, rounds=12)
    fig = report_plots.plot_curves(few, few.columns[0])
    assert len(fig.axes) == 1 and fig.axes[0].get_legend() is not None and not fig.legends
    assert not report_plots.plot_per_class(few, few.columns[0]).axes[0].images  # bars

    many = many_methods_sweep(tmp_path / "many", methods=12, rounds=24)
    fig = report_plots.plot_curves(many, many.columns[0])
    whole, late = fig.axes
    assert len(whole.lines) == len(late.lines) == 12 and len(fig.legends) == 1
    assert [int(x) for x in late.lines[0].get_xdata()] == list(range(13, 25))
    styles = {(line.get_color(), line.get_linestyle()) for line in whole.lines}
    assert len(styles) == 12  # the default colour cycle repeats after ten
    per_class = report_plots.plot_per_class(many, many.columns[0])
    (image,) = per_class.axes[0].images
    values = report_plots.per_class_means(many, many.columns[0])
    assert image.get_array().shape == (12, 10)
    assert image.get_array()[3][7] == pytest.approx(100 * values[many.rows[3]][7])
    assert per_class.axes[0].get_xticklabels()[0].get_text() == "0\n(600)"


def test_line_styles_differ_for_forty_curves() -> None:
    from fedlt_app.run_plots import line_style

    styles = [tuple(line_style(i).values()) for i in range(40)]
    assert len(set(styles)) == 40
