"""benchmarks/two_heads.py: the three readings of RedGrape's heads and the drift of W − Ŵ on real runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark
from in_process import small_finished_run

two_heads_module = load_benchmark("two_heads")


def test_without_rebalancing_the_heads_move_together_and_w_is_what_the_run_measured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # λ 0: the two-head loss gives W and Ŵ the same gradient, so W − Ŵ keeps its round-0 value exactly
    run_dir, final = small_finished_run(tmp_path, monkeypatch,
                                        "method='grape-la' rebalance-lambda=0.0 num-server-rounds=2")
    report = two_heads_module.two_heads(run_dir)
    assert report["round"] == 2 and report["rebalance_lambda"] == 0.0
    assert report["difference_moved"] < 1e-5
    run_reading = report["readings"]["W (the run's)"]
    assert run_reading["accuracy"] == pytest.approx(final["accuracy"], abs=1e-6)
    assert run_reading["per_class_accuracy"] == pytest.approx(final["per_class_accuracy"], abs=1e-6)
    assert "| r (final) | 0 | 2 |" in two_heads_module.markdown([report])


def test_rebalancing_moves_w_away_from_its_supplementary_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _ = small_finished_run(tmp_path, monkeypatch, "method='redgrape' rebalance-lambda=1.0 num-server-rounds=2")
    assert two_heads_module.two_heads(run_dir)["difference_moved"] > 1e-3


def test_a_one_head_run_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _ = small_finished_run(tmp_path, monkeypatch, "method='fedavg' num-server-rounds=2")
    with pytest.raises(SystemExit, match="method='fedavg' has one head"):
        two_heads_module.two_heads(run_dir)
