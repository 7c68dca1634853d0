"""FairFAL through the real ServerApp and ClientApp (in process): 3 clients, 3 small cycles, twice with one seed
(the second also recording each cycle's curve); then a third run with that seed stopped while it trains cycle 3
and continued with ``resume-from``: the clients rebuild their labeled sets by replaying the queries, and the
continued run must end exactly where the uninterrupted one did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from in_process import run_in_process

from fedlt_app.active import driver
from fedlt_app.checkpoint import load_checkpoint, save_checkpoint
from fedlt_app.config import ConfigError
from fedlt_app.configured_data import federated_data
from fedlt_app.data import tail_classes
from fedlt_app.metrics import evaluate
from fedlt_app.task import trained_model

CLIENTS = 3
BUDGET = 5  # round(335, -2) * 0.05 = 15 labels per cycle over 3 clients

ROUNDS_PER_CYCLE = 2


class Interrupted(Exception):
    pass


def _start(tmp: Path, name: str, extra: str = "", stop_at_cycle: int | None = None) -> None:
    """One run; with ``stop_at_cycle`` (0-based) it is stopped as that cycle's training starts."""
    run_config = (
        f"preset='fairfal-fmnist-lt' samples-per-class=100 al-end-ratio=0.15 fl-rounds-per-cycle={ROUNDS_PER_CYCLE} "
        f"local-epochs=1 fairfal-local-epochs=5 output-dir='{tmp / 'out'}' run-name='{name}' {extra}"
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        if stop_at_cycle is not None:
            train_cycle = driver._train_cycle

            def stop(*args, **kwargs):  # type: ignore[no-untyped-def]
                if args[4] == stop_at_cycle:  # (grid, cfg, data, federation, cycle, ...)
                    raise Interrupted(f"stopped in cycle {stop_at_cycle + 1}")
                return train_cycle(*args, **kwargs)

            monkeypatch.setattr(driver, "_train_cycle", stop)
        assert run_in_process(tmp, monkeypatch, run_config, num_clients=CLIENTS) == 0


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(tmp: Path, name: str, extra: str = "") -> list[dict]:
    _start(tmp, name, extra)
    summary = json.loads((tmp / "out" / name / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["config"]["active_learning"]["per_client"] == BUDGET
    return _rows(tmp / "out" / name)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fairfal-e2e")


@pytest.fixture(scope="module")
def two_runs(runs_dir: Path) -> tuple[list[dict], list[dict]]:
    return _run(runs_dir, "a"), _run(runs_dir, "b", "al-cycle-curve=true")


def test_labeled_sets_grow_by_exactly_the_budget_and_stay_disjoint(two_runs: tuple[list[dict], list[dict]]) -> None:
    rows = two_runs[0]
    assert [r["cycle"] for r in rows] == [1, 2, 3]
    assert [r["target_ratio"] for r in rows] == [0.05, 0.1, 0.15]
    # clients count their *distinct* labeled positions, so "previous + queried" rules out any overlap
    assert [r["num_labeled"] for r in rows] == [CLIENTS * BUDGET * c for c in (1, 2, 3)]
    assert [r["num_queried"] for r in rows] == [CLIENTS * BUDGET] * 3
    assert all(0.0 <= r["accuracy"] <= 1.0 and len(r["per_class_accuracy"]) == 10 for r in rows)
    assert rows[1]["labeled_ratio"] == pytest.approx(2 * rows[0]["labeled_ratio"])


def test_only_scalars_left_the_clients(two_runs: tuple[list[dict], list[dict]]) -> None:
    rows = two_runs[0]
    assert all(r["queried_per_class"] is None for r in rows)  # histograms stay off by default
    for row in rows[1:]:  # r_k and d_k per client, r̄ frozen after the first query
        assert len(row["fairfal_r"]) == CLIENTS and len(row["fairfal_d"]) == CLIENTS
        assert all(0.0 < r <= 1.0 for r in row["fairfal_r"]) and all(0.0 <= d < 1.0 for d in row["fairfal_d"])
        assert row["fairfal_r_bar"] == rows[1]["fairfal_r_bar"]
    assert rows[1]["fairfal_r_bar"] == pytest.approx(sum(rows[1]["fairfal_r"]) / CLIENTS)


def test_the_same_seed_gives_the_same_selections(two_runs: tuple[list[dict], list[dict]]) -> None:
    first, second = two_runs
    assert [r["selection_digests"] for r in first] == [r["selection_digests"] for r in second]
    digests = [d for r in first for d in r["selection_digests"]]
    assert len(set(digests)) == len(digests)  # every client's set changes every cycle


def test_the_cycle_curve_records_every_round_without_changing_the_run(
        two_runs: tuple[list[dict], list[dict]]) -> None:
    plain, curved = two_runs
    assert not any("cycle_accuracy" in r for r in plain)  # off by default
    for p, c in zip(plain, curved, strict=True):
        assert len(c["cycle_accuracy"]) == len(c["cycle_tail_accuracy"]) == ROUNDS_PER_CYCLE
        # the curve ends at the cycle's reported model, and evaluating every round changes no training
        assert c["cycle_accuracy"][-1] == c["accuracy"] == p["accuracy"]
        assert c["cycle_tail_accuracy"][-1] == c["tail_accuracy"]


def test_the_last_cycles_model_is_kept_and_rebuilds_its_accuracy(
        runs_dir: Path, two_runs: tuple[list[dict], list[dict]]) -> None:
    model, cfg = trained_model(runs_dir / "out" / "a")
    data = federated_data(cfg, CLIENTS)
    result = evaluate(model, *data.test_data(), cfg.dataset, tail_classes(data.class_counts), data.class_counts)
    assert result.accuracy == two_runs[0][-1]["accuracy"]


@pytest.fixture(scope="module")
def interrupted(runs_dir: Path) -> Path:
    """Run "a" again, stopped as cycle 3's training starts."""
    with pytest.raises(Interrupted):
        _start(runs_dir, "interrupted", stop_at_cycle=2)
    return runs_dir / "out" / "interrupted"


def test_an_interrupted_run_keeps_a_checkpoint_of_its_finished_cycles(
        interrupted: Path, two_runs: tuple[list[dict], list[dict]]) -> None:
    assert json.loads((interrupted / "summary.json").read_text())["status"] == "failed"
    state = load_checkpoint(interrupted)
    assert state["kind"] == "active-learning" and state["round"] == 2
    assert state["rounds_done"] == 2 * ROUNDS_PER_CYCLE and len(state["final_arrays"]) == 2
    assert state["digests"] == [r["selection_digests"] for r in two_runs[0][:2]]


def test_the_resumed_run_ends_where_the_uninterrupted_one_did(
        interrupted: Path, two_runs: tuple[list[dict], list[dict]], tmp_path: Path) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(interrupted, resumed)
    _start(tmp_path, "unused", f"resume-from='{resumed}'")
    assert json.loads((resumed / "summary.json").read_text())["status"] == "completed"
    expected, got = two_runs[0], _rows(resumed)
    assert [r["cycle"] for r in got] == [1, 2, 3]
    for key in ("accuracy", "tail_accuracy", "per_class_accuracy", "selection_digests", "num_labeled",
                "labeled_per_class", "fairfal_r", "fairfal_d", "fairfal_r_bar", "fl_rounds", "train_loss"):
        assert [r.get(key) for r in got] == [r.get(key) for r in expected], key
    assert load_checkpoint(resumed)["round"] == 3


def test_a_replay_that_labels_other_samples_stops_the_run(interrupted: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(interrupted, tampered)
    state = load_checkpoint(tampered)
    state["digests"][1][0] += 1
    save_checkpoint(tampered, state)
    with pytest.raises(RuntimeError, match="replayed selections of cycle 2 differ"):
        _start(tmp_path, "unused", f"resume-from='{tampered}'")


def test_a_changed_config_or_a_federated_checkpoint_is_refused(interrupted: Path, tmp_path: Path) -> None:
    changed = tmp_path / "changed"
    shutil.copytree(interrupted, changed)
    with pytest.raises(ValueError, match="resume-from: .*weight-decay"):
        _start(tmp_path, "unused", f"resume-from='{changed}' weight-decay=0.001")
    state = load_checkpoint(changed)
    save_checkpoint(changed, {"round": 1, "run_config": state["run_config"], "torch_rng": torch.get_rng_state()})
    with pytest.raises(ConfigError, match="federated run's checkpoint"):
        _start(tmp_path, "unused", f"resume-from='{changed}'")
