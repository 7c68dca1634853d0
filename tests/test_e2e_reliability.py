"""Reproducibility, kill-and-resume and failing clients, through the real engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from app_runs import kill_after_checkpoint, run_app, without_timing
from app_runs import metrics_rows as rows

from fedlt_app import launch

ROOT = Path(__file__).resolve().parent.parent
SMALL = "method='redgrape' samples-per-class=100 imbalance-ratio=10.0 local-lr=0.05"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 4-round run."""
    tmp = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert run_app(tmp, monkeypatch, f"{SMALL} num-server-rounds=4 output-dir='{tmp}' run-name='a'") == 0
    return tmp / "a"


def test_same_seed_gives_identical_metrics(reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_app(tmp_path, monkeypatch, f"{SMALL} num-server-rounds=4 output-dir='{tmp_path}' run-name='b'") == 0
    first, second = rows(reference), rows(tmp_path / "b")
    assert len(first) == 4
    assert without_timing(first) == without_timing(second)


def test_killed_run_resumes_to_the_same_result(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "c"
    killed_at = kill_after_checkpoint(
        tmp_path, f"{SMALL} num-server-rounds=4 checkpoint-every=1 output-dir='{tmp_path}' run-name='c'", run_dir, 2,
        limit=300)
    assert killed_at == 2
    assert not (run_dir / "summary.json").exists() or json.loads((run_dir / "summary.json").read_text())[
        "status"] != "completed"

    code = launch.run(ROOT, f"{SMALL} num-server-rounds=4 checkpoint-every=1 resume-from='{run_dir}'",
                      num_clients=3, cpus=1, gpus=0.0, timeout=600)
    assert code == 0
    assert without_timing(rows(run_dir)) == without_timing(rows(reference))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_killed_moon_run_resumes_with_its_clients_state_to_the_same_result(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """MOON keeps each client's previous model on its node: through Ray too, the clients write it to the run
    folder (persist-client-state) and a resumed run's clients read the checkpointed round's."""
    moon = "method='moon' samples-per-class=60 imbalance-ratio=10.0 checkpoint-every=2"
    assert run_app(tmp_path, monkeypatch, f"{moon} num-server-rounds=4 output-dir='{tmp_path}' run-name='m'") == 0
    run_dir = tmp_path / "k"
    killed_at = kill_after_checkpoint(
        tmp_path, f"{moon} num-server-rounds=4 output-dir='{tmp_path}' run-name='k'", run_dir, 2, limit=300)
    assert killed_at == 2
    assert sorted(p.name for p in (run_dir / "client-state").iterdir()) == ["partition-0", "partition-1",
                                                                            "partition-2"]
    code = launch.run(ROOT, f"{moon} num-server-rounds=4 resume-from='{run_dir}'", num_clients=3, cpus=1,
                      gpus=0.0, timeout=600)
    assert code == 0
    resumed, reference = without_timing(rows(run_dir)), without_timing(rows(tmp_path / "m"))
    assert [r["moon_clients_with_previous"] for r in reference] == [0, 3, 3, 3]
    assert resumed == reference


def test_failing_and_silent_clients_are_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = run_app(
        tmp_path,
        monkeypatch,
        f"{SMALL} num-server-rounds=1 debug-fail-partitions='1' debug-hang-partitions='3' round-timeout=60.0 "
        f"max-failure-fraction=0.5 output-dir='{tmp_path}' run-name='f'",
        num_clients=4,
    )
    assert code == 0
    (row,) = rows(tmp_path / "f")
    assert row["failed_clients"] == [1, 3]
    assert row["classes_with_prototype"] == 10  # from the two clients that answered


def test_too_many_failures_fail_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = run_app(tmp_path, monkeypatch,
                   f"{SMALL} num-server-rounds=2 debug-fail-partitions='0,1' output-dir='{tmp_path}' run-name='g'")
    assert code == 1
    assert rows(tmp_path / "g") == []
    assert json.loads((tmp_path / "g" / "summary.json").read_text())["status"] == "failed"
