"""benchmarks/classifier_ceiling.py: its probes on a hand-built case and on a real run's checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark
from in_process import small_finished_run

ceiling_module = load_benchmark("classifier_ceiling")


def two_overlapping_classes(n0: int, n1: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D Gaussians at -1 and +1 (std 1): the balanced error's best threshold is 0, whatever n0 and n1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n0, 1, generator=g) - 1, torch.randn(n1, 1, generator=g) + 1])
    return x, torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])


def test_balanced_head_puts_the_threshold_where_the_balanced_error_wants_it() -> None:
    # 100:1 imbalance; plain cross-entropy would move the threshold ~log(100)/2 = 2.3 std into the rare class
    features, labels = two_overlapping_classes(5000, 50, seed=0)
    head = ceiling_module.train_linear_head(features, labels, num_classes=2, seed=0, weight_decay=0.0)
    head.requires_grad_(False)
    threshold = float(-(head.bias[1] - head.bias[0]) / (head.weight[1, 0] - head.weight[0, 0]))
    assert abs(threshold) < 0.35
    test_x, test_y = two_overlapping_classes(2000, 2000, seed=1)
    result = ceiling_module.accuracies(head(test_x), test_y, tail=[1], num_classes=2)
    rare, frequent = result["per_class_accuracy"][1], result["per_class_accuracy"][0]
    assert rare > 0.75 and frequent > 0.75 and result["tail_accuracy"] == rare


def test_global_head_probe_reproduces_the_runs_final_accuracy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    method = "redgrape"  # a model with a second head (Ŵ): the checkpoint must load into the method's own model
    run_dir, final = small_finished_run(tmp_path, monkeypatch, f"method='{method}' num-server-rounds=2")
    report = ceiling_module.ceiling(run_dir, oracle_per_class=60)
    assert report["round"] == 2 and report["method"] == method
    assert report["probes"]["global head"]["accuracy"] == pytest.approx(final["accuracy"], abs=1e-6)
    assert report["probes"]["global head"]["per_class_accuracy"] == pytest.approx(final["per_class_accuracy"], abs=1e-6)
    for probe in ceiling_module.PROBES:
        assert 0.0 <= report["probes"][probe]["accuracy"] <= 1.0
    text = ceiling_module.markdown([report])
    assert "| r (checkpoint) | 2 |" in text and "oracle re-train" in text


def test_final_model_probe_is_the_weight_average_and_checkpoint_the_latest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # with swa-start the run evaluates the mean of rounds 2-3 (final_model.pt), while checkpoint.pt holds the
    # latest global model, whose accuracy the run logs as unaveraged_accuracy
    run_dir, final = small_finished_run(tmp_path, monkeypatch, "method='fedavg-la' num-server-rounds=3 swa-start=2")
    assert final["swa_models"] == 2 and final["accuracy"] != final["unaveraged_accuracy"]
    averaged = ceiling_module.ceiling(run_dir, oracle_per_class=60, which="final")
    latest = ceiling_module.ceiling(run_dir, oracle_per_class=60, which="checkpoint")
    assert averaged["round"] == latest["round"] == 3 and averaged["model"] == "final"
    assert averaged["probes"]["global head"]["accuracy"] == pytest.approx(final["accuracy"], abs=1e-6)
    assert latest["probes"]["global head"]["accuracy"] == pytest.approx(final["unaveraged_accuracy"], abs=1e-6)
    assert "| r (final) | 3 |" in ceiling_module.markdown([averaged])
