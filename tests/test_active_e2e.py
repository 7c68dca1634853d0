"""FairFAL through the real ServerApp and ClientApp (in process): 3 clients, 3 small cycles, twice with one seed
(the second also recording each cycle's curve)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from in_process import run_in_process

from fedlt_app.configured_data import federated_data
from fedlt_app.data import tail_classes
from fedlt_app.metrics import evaluate
from fedlt_app.task import trained_model

CLIENTS = 3
BUDGET = 5  # round(335, -2) * 0.05 = 15 labels per cycle over 3 clients

ROUNDS_PER_CYCLE = 2


def _run(tmp: Path, name: str, extra: str = "") -> list[dict]:
    run_config = (
        f"preset='fairfal-fmnist-lt' samples-per-class=100 al-end-ratio=0.15 fl-rounds-per-cycle={ROUNDS_PER_CYCLE} "
        f"local-epochs=1 fairfal-local-epochs=5 output-dir='{tmp / 'out'}' run-name='{name}' {extra}"
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert run_in_process(tmp, monkeypatch, run_config, num_clients=CLIENTS) == 0
    summary = json.loads((tmp / "out" / name / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["config"]["active_learning"]["per_client"] == BUDGET
    return [json.loads(line) for line in (tmp / "out" / name / "metrics.jsonl").read_text().splitlines()]


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
