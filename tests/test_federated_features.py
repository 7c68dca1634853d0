"""benchmarks/federated_features.py: where CReFF's federated features sit against the real ones, and its heads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark
from in_process import small_finished_run

features_module = load_benchmark("federated_features")


def test_class_geometry_on_a_hand_built_case() -> None:
    # real: class 0 at (2, 0), class 1 at (0, 4); federated class 0 = {(3, 0), (1, 2)}, class 1 = {(0, 2), (0, 2)}
    real, real_labels = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 4.0]]), torch.tensor([0, 0, 1, 1])
    federated = torch.tensor([[3.0, 0.0], [1.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    zero, one = features_module.class_geometry(real, real_labels, federated, torch.tensor([0, 0, 1, 1]), 2)
    assert zero["real_norm"] == pytest.approx(2.0) and one["real_norm"] == pytest.approx(4.0)
    assert zero["federated_norm"] == pytest.approx((3 + math.sqrt(5)) / 2) and one["federated_norm"] == pytest.approx(2)
    assert zero["mean_cosine"] == pytest.approx(2 / math.sqrt(5)) and one["mean_cosine"] == pytest.approx(1.0)
    assert (zero["nearest_real_mean"], one["nearest_real_mean"]) == (0, 1)
    assert zero["share_nearest_own"] == pytest.approx(0.5)  # (1, 2) is nearer class 1's direction
    assert one["share_nearest_own"] == pytest.approx(1.0)
    # |(2, 1) − (2, 0)| / 2 and |(0, 2) − (0, 4)| / 4
    assert zero["mean_offset"] == pytest.approx(0.5) and one["mean_offset"] == pytest.approx(0.5)


def test_recentring_moves_a_class_mean_onto_the_real_one_and_keeps_its_spread() -> None:
    federated, labels = torch.tensor([[3.0, 0.0], [1.0, 2.0], [0.0, 2.0], [1.0, 2.0]]), torch.tensor([0, 0, 1, 1])
    real_means = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    moved = features_module.recentred(federated, labels, real_means, [1])
    assert moved[labels == 1].mean(dim=0).tolist() == pytest.approx([0.0, 4.0])
    assert (moved[3] - moved[2]).tolist() == pytest.approx((federated[3] - federated[2]).tolist())
    assert torch.equal(moved[labels == 0], federated[labels == 0])  # the other class stays where it was
    assert torch.equal(federated[2], torch.tensor([0.0, 2.0]))  # a copy: the input is untouched


def test_the_real_draw_takes_as_many_of_each_class_even_of_a_rarer_one() -> None:
    labels = torch.tensor([0] * 50 + [1] * 3)
    drawn = features_module.balanced_draw(labels, 10, 2, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[drawn], minlength=2).tolist() == [10, 10]
    assert set(drawn[10:].tolist()) <= {50, 51, 52}
    with pytest.raises(ValueError, match="class 2 has no training image"):
        features_module.balanced_draw(labels, 10, 3, torch.Generator().manual_seed(0))


def test_a_finished_creff_run_s_head_is_what_the_run_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, final = small_finished_run(
        tmp_path, monkeypatch,
        "method='creff' num-server-rounds=2 creff-features-per-class=8 creff-match-steps=5 creff-retrain-epochs=3")
    report = features_module.study(run_dir)
    assert report["heads"]["run's head"]["per_class_accuracy"] == pytest.approx(final["per_class_accuracy"], abs=1e-6)
    assert len(report["geometry"]) == 10 and len(report["heads"]) == 4 + 10
    assert all(-1 <= g["mean_cosine"] <= 1 for g in report["geometry"])
    counts = json.loads((run_dir / "config.json").read_text())["client_class_counts"]
    assert report["clients_holding"] == [sum(int(row[c] > 0) for row in counts) for c in range(10)]


def test_the_study_refuses_a_run_of_another_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _ = small_finished_run(tmp_path, monkeypatch, "method='fedavg' num-server-rounds=1")
    with pytest.raises(ValueError, match="method is 'fedavg'"):
        features_module.study(run_dir)

