"""benchmarks/posthoc_adjustment.py: the adjustment on a hand-built case and on a real run's final network."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark
from in_process import run_in_process

from fedlt_app.configured_data import federated_data
from fedlt_app.data.transforms import to_float
from fedlt_app.task import trained_model

adjustment = load_benchmark("posthoc_adjustment")


def test_adjustment_subtracts_strength_times_log_prior_and_can_flip_the_decision() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    counts = [99, 1]  # π = (0.99, 0.01)
    adjusted = adjustment.adjusted_logits(logits, counts, 0.5)
    expected = logits - 0.5 * torch.log(torch.tensor([0.99, 0.01]))
    assert torch.allclose(adjusted, expected)
    assert torch.equal(adjustment.adjusted_logits(logits, counts, 0.0), logits)
    # the rare class gains 0.5 * log(99) = 2.30 over the frequent one: enough to overturn a 1-logit lead
    assert adjusted.argmax(dim=1).tolist() == [1, 1]
    small = adjustment.adjusted_logits(logits, counts, 0.1)  # 0.1 * log(99) = 0.46 < 1
    assert small.argmax(dim=1).tolist()[0] == 0 and math.isclose(float(small[1, 1] - small[1, 0]), 0.1 * math.log(99),
                                                                  rel_tol=1e-5)


def test_sweep_on_a_weight_averaged_run_starts_at_the_runs_own_accuracy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    run_in_process(tmp_path, monkeypatch, "method='fedavg-la' fedavg-la-tau=0.5 num-server-rounds=3 swa-start=2 "
                   "local-epochs=3 "
                   f"samples-per-class=60 imbalance-ratio=10.0 precision='fp32' output-dir='{out}' run-name='r'",
                   num_clients=2)
    run_dir = out / "r"
    final = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    report = adjustment.adjustment_sweep(run_dir, (1.0,), which="final")  # τ' 0 is always added
    assert report["round"] == 3 and report["trained_tau"] == 0.5 and report["method"] == "fedavg-la"
    own = report["strengths"]["0.0"]
    assert own["accuracy"] == pytest.approx(final["accuracy"], abs=1e-6)  # the weight average, as evaluated
    assert own["per_class_accuracy"] == pytest.approx(final["per_class_accuracy"], abs=1e-6)
    assert report["strengths"]["1.0"]["per_class_accuracy"] != own["per_class_accuracy"]
    assert set(report["training_recall"]) == {"0.0", "1.0"}
    assert report["training_pick"] == max(report["training_recall"], key=lambda s: (
        report["training_recall"][s], -abs(float(s))))
    # the recall is read on the clients' training images, each class weighing alike, by the run's own network
    model, cfg = trained_model(run_dir)
    data = federated_data(cfg, 2)
    images = torch.cat([data.client_data(p)[0] for p in range(2)])
    labels = torch.cat([data.client_data(p)[1] for p in range(2)])
    with torch.no_grad():
        hits = model(to_float(images, cfg.dataset)).argmax(dim=1) == labels
    expected = sum(float(hits[labels == c].float().mean()) for c in labels.unique()) / len(labels.unique())
    assert report["training_recall"]["0.0"] == pytest.approx(expected, abs=1e-6)
    text = adjustment.markdown([report])
    assert "| r (final, τ 0.5) | 3 |" in text and "τ' 1.0" in text
    assert f"| r | {100 * report['training_recall']['0.0']:.2f} |" in text
