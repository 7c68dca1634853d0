"""benchmarks/confusion.py: a run's confusion matrix, and its confusions set against the partition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark
from in_process import small_finished_run

confusion_module = load_benchmark("confusion")


def test_confusion_matrix_counts_true_rows_and_predicted_columns() -> None:
    predictions, labels = torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 0, 1, 2, 2])
    assert confusion_module.confusion_matrix(predictions, labels, 3) == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_share_on_clients_without_the_predicted_class() -> None:
    # class 0's images: 30 on client 0 (no class 1), 10 on client 1 (has class 1), 0 on client 2
    counts = [[30, 0, 5], [10, 4, 0], [0, 7, 7]]
    assert confusion_module.share_on_clients_without(counts, true=0, predicted=1) == pytest.approx(0.75)
    assert confusion_module.share_on_clients_without(counts, true=1, predicted=0) == pytest.approx(7 / 11)
    assert confusion_module.share_on_clients_without(counts, true=2, predicted=1) == pytest.approx(5 / 12)
    assert confusion_module.share_on_clients_without([[0, 3], [0, 2]], true=0, predicted=1) == 0.0  # nobody holds 0


def test_largest_confusions_rank_by_the_true_class_share() -> None:
    matrix = [[90, 10, 0], [0, 5, 5], [30, 0, 70]]
    assert confusion_module.largest_confusions(matrix, top=2) == [(1, 2), (2, 0)]


def test_a_finished_run_s_confusion_is_what_the_run_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, final = small_finished_run(tmp_path, monkeypatch, "method='fedlc' num-server-rounds=2")
    report = confusion_module.confusion(run_dir, top=3)
    matrix = torch.tensor(report["confusion"])
    assert (matrix.diag().float() / matrix.sum(dim=1)).tolist() == pytest.approx(final["per_class_accuracy"], abs=1e-6)
    assert report["client_class_counts"] == json.loads((run_dir / "config.json").read_text())["client_class_counts"]
    assert len(report["largest_confusions"]) <= 3
    assert "| true \\ predicted |" in confusion_module.markdown([report])
