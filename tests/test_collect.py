"""``python -m fedlt_app.collect``: which run folders of another clone reach this checkout, and with which files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlt_app import collect, sweep


def write_run(folder: Path, records: int, status: str | None, checkpoint: bool = False, method: str = "random",
              seed: int = 0) -> Path:
    """A run folder as a FairFAL run or a sweep cell leaves it (records: its metrics.jsonl lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"run_config": {"al-method": method, "seed": seed}}))
    rows = [{"cycle": i + 1, "target_ratio": 0.05 * (i + 1), "labeled_ratio": 0.05 * (i + 1),
             "accuracy": 0.5 + 0.01 * i, "tail_accuracy": 0.3} for i in range(records)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if status is not None:
        (folder / "summary.json").write_text(json.dumps({"status": status}))
        (folder / "curves.png").write_bytes(b"png")
    if checkpoint:
        (folder / "checkpoint.pt").write_bytes(f"state after {records}".encode())
    if status == "completed":
        (folder / "final_model.pt").write_bytes(b"model")
    return folder


def test_a_finished_run_comes_without_its_models_and_drops_the_checkpoint_left_for_it(tmp_path: Path) -> None:
    source = write_run(tmp_path / "src" / "run", 9, "completed", checkpoint=True)
    target = write_run(tmp_path / "dst" / "run", 6, None, checkpoint=True)  # committed mid-way by an earlier session
    copied = collect.collect_run(source, target)
    assert copied == collect.Collected(target, finished=True, records=9)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "curves.png", "metrics.jsonl", "summary.json"]
    assert (target / "metrics.jsonl").read_text() == (source / "metrics.jsonl").read_text()


def test_an_unfinished_run_comes_with_what_resuming_needs(tmp_path: Path) -> None:
    source = write_run(tmp_path / "src" / "run", 7, "running", checkpoint=True)
    target = tmp_path / "dst" / "run"
    assert collect.collect_run(source, target) == collect.Collected(target, finished=False, records=7)
    assert sorted(p.name for p in target.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert (target / "checkpoint.pt").read_bytes() == b"state after 7"


def test_unfinished_runs_that_nothing_could_continue_are_named(tmp_path: Path) -> None:
    assert collect.not_continuable(write_run(tmp_path / "a", 5, "running")) == "no checkpoint"
    assert collect.not_continuable(write_run(tmp_path / "b", 5, None, checkpoint=True)) is None
    moon = write_run(tmp_path / "c", 5, None, checkpoint=True)  # from before persist-client-state: memory only
    (moon / "config.json").write_text(json.dumps({"run_config": {"method": "moon"}}))
    assert "moon keeps state on its clients, which this run kept in memory only" in collect.not_continuable(moon)
    (moon / "config.json").write_text(json.dumps({"run_config": {"method": "moon", "persist-client-state": False}}))
    assert "moon keeps state on its clients" in collect.not_continuable(moon)
    (moon / "config.json").write_text(json.dumps({"run_config": {"method": "moon", "persist-client-state": True}}))
    assert collect.not_continuable(moon) is None  # its clients wrote their state to the run folder
    (moon / "config.json").write_text(json.dumps({"run_config": {"method": "moon", "persist-client-state": True,
                                                                 "checkpoint-every": 0}}))
    assert "moon keeps state on its clients" in collect.not_continuable(moon)  # without checkpoints: nothing
    fedavg = write_run(tmp_path / "d", 5, None, checkpoint=True)
    (fedavg / "config.json").write_text(json.dumps({"run_config": {"method": "fedavg"}}))
    assert collect.not_continuable(fedavg) is None


def test_an_unfinished_runs_checkpointed_client_states_come_with_it_and_replace_older_ones(tmp_path: Path) -> None:
    import torch

    source = write_run(tmp_path / "src" / "run", 7, "running")
    torch.save({"round": 5}, source / "checkpoint.pt")  # killed after round 7; its last checkpoint: round 5
    for partition, rounds in ((0, (3, 5, 7)), (1, (2, 6)), (2, (6,))):
        (source / "client-state" / f"partition-{partition}").mkdir(parents=True)
        for r in rounds:
            (source / "client-state" / f"partition-{partition}" / f"round-{r}.npz").write_bytes(b"%d" % r)
    target = write_run(tmp_path / "dst" / "run", 5, "running", checkpoint=True)
    (target / "client-state" / "partition-1").mkdir(parents=True)
    (target / "client-state" / "partition-1" / "round-1.npz").write_bytes(b"an older collection's")
    collect.collect_run(source, target)
    # per client the newest up to the checkpoint: what the resume reads (partition 2 first trained after it)
    assert sorted(p.relative_to(target).as_posix() for p in (target / "client-state").rglob("*.npz")) == [
        "client-state/partition-0/round-5.npz", "client-state/partition-1/round-2.npz"]
    finished = write_run(tmp_path / "src" / "done", 9, "completed", checkpoint=True)
    (finished / "client-state").mkdir()
    collect.collect_run(finished, target)
    assert not (target / "client-state").exists()  # a finished run needs none, like its checkpoint


@pytest.mark.parametrize(("source_args", "target_args"), [
    ((5, None, True), (5, None, True)),  # as far along here already
    ((5, None, True), (7, None, True)),  # further along here
    ((9, "completed", False), (9, "completed", False)),  # finished here already
])
def test_runs_this_checkout_has_as_far_along_are_kept(tmp_path: Path, source_args: tuple, target_args: tuple | None
                                                       ) -> None:
    source = write_run(tmp_path / "src" / "run", *source_args)
    target = tmp_path / "dst" / "run"
    if target_args is not None:
        write_run(target, *target_args)
    before = {p.name: p.read_bytes() for p in target.iterdir()} if target.exists() else None
    assert collect.collect_run(source, target) is None
    assert ({p.name: p.read_bytes() for p in target.iterdir()} if target.exists() else None) == before


def test_main_copies_and_rewrites_the_tables_the_runs_belong_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    fairfal = "results/fairfal"
    write_run(src / fairfal / "p-fairfal-seed1", 3, "completed", method="fairfal", seed=1)
    write_run(src / fairfal / "p-random-seed1", 2, None, checkpoint=True, seed=1)
    write_run(dst / fairfal / "p-random-seed0", 3, "completed")  # committed before: stays in the table
    write_run(src / fairfal / "p-entropy-seed1", 1, "running")  # no checkpoint: left out, said so
    cell = write_run(src / "results/conv/runs/fedavg__seed-0", 4, "completed")
    (src / "results/conv/sweep.json").write_text(json.dumps({"source": "conf/sweeps/conv.yaml"}))
    (dst / "results/conv").mkdir(parents=True)
    (dst / "results/conv/sweep.json").write_text(json.dumps({"source": "conf/sweeps/conv.yaml"}))
    sweeps: list[list[str]] = []
    monkeypatch.setattr(sweep, "main", lambda argv: sweeps.append(argv) or 0)

    assert collect.main([str(src), "--into", str(dst)]) == 0
    assert (dst / "results/conv/runs" / cell.name / "summary.json").is_file()
    assert sweeps == [[str(dst / "conf/sweeps/conv.yaml"), "--output", str(dst / "results"), "--report-only"]]
    table = (dst / fairfal / "p.md").read_text()
    assert "fairfal 1 (1)" in table and "random 1 (0)" in table  # the unfinished random seed 1 is not tabled
    out = capsys.readouterr().out
    assert "git add -f results/fairfal/p-random-seed1/checkpoint.pt" in out
    assert "left out results/fairfal/p-entropy-seed1 (unfinished: no checkpoint)" in out
    assert not (dst / fairfal / "p-entropy-seed1").exists()

    sweeps.clear()  # a second collection finds nothing new
    assert collect.main([str(src), "--into", str(dst)]) == 0
    assert sweeps == [] and "collect: nothing new" in capsys.readouterr().out


def test_the_first_runs_of_a_new_sweep_bring_its_manifest_so_its_tables_are_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_run(src / "results/new/runs/a__seed-0", 3, "completed")
    write_run(src / "results/new/runs/b__seed-0", 1, "running")  # no checkpoint: left out
    (src / "results/new/sweep.json").write_text(json.dumps({"source": "conf/sweeps/new.yaml"}))
    (src / "results/new/cells.jsonl").write_text('{"cell": "a__seed-0"}\n')
    (dst / "results").mkdir(parents=True)
    sweeps: list[list[str]] = []
    monkeypatch.setattr(sweep, "main", lambda argv: sweeps.append(argv) or 0)

    assert collect.main([str(src), "--into", str(dst)]) == 0
    assert (dst / "results/new/sweep.json").read_text() == (src / "results/new/sweep.json").read_text()
    assert (dst / "results/new/cells.jsonl").read_text() == (src / "results/new/cells.jsonl").read_text()
    assert sweeps == [[str(dst / "conf/sweeps/new.yaml"), "--output", str(dst / "results"), "--report-only"]]


def test_main_refuses_a_folder_without_results(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        collect.main([str(tmp_path), "--into", str(tmp_path / "elsewhere")])
