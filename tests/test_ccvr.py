"""CCVR's defining rules, each against an independent numpy computation.

Exact moment combination (the paper's Eqs. 3-4 reproduce the pooled mean and
unbiased covariance), Gaussian virtual features with the target moments, a
calibration that changes only the classifier, and one run through Flower's
engine (with the statistics query before each evaluation).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from in_process import record_calls, run_in_process, run_off_and_secagg
from test_baselines import C, D, features_of, federated, images_labels, linear_model
from torch.nn import functional as F

from fedlt_app.checkpoint import load_checkpoint
from fedlt_app.config import resolve
from fedlt_app.configured_data import federated_data
from fedlt_app.data import tail_classes
from fedlt_app.methods.base import ClientReport
from fedlt_app.methods.decoupled.ccvr import (
    CCVRClient,
    CCVRServer,
    class_moments,
    class_sums,
    combine_moments,
    moments_from_sums,
    sample_gaussian,
)
from fedlt_app.metrics import evaluate
from fedlt_app.precision import FP32
from fedlt_app.task import trained_model


def ccvr_config(**overrides):  # type: ignore[no-untyped-def]
    base = {"method": "ccvr", "ccvr-virtual-per-class": 200, "ccvr-retrain-epochs": 3, "ccvr-retrain-lr": 0.05,
            "batch-size": 32, "num-server-rounds": 3, "precision": "fp32"}
    return resolve({**base, **overrides})


def test_combined_moments_equal_the_pooled_statistics_of_the_concatenated_features() -> None:
    rng = np.random.default_rng(0)
    d = 4
    # three clients; class 0 on all, class 1 once on one client and 4 times on another, class 2 on one client only
    held = [{0: 7, 1: 1}, {0: 3, 2: 5}, {0: 12, 1: 4}]
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    payloads = []
    for k, counts in enumerate(held):
        labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
        features = rng.normal(loc=k + labels[:, None], scale=1.0 + k, size=(len(labels), d))
        parts.append((features, labels))
        payloads.append(class_moments(torch.from_numpy(features), torch.from_numpy(labels), C))
        for row, c in enumerate(payloads[-1]["ccvr-classes"].tolist()):  # each client: unbiased per-class moments
            x = features[labels == c]
            assert payloads[-1]["ccvr-counts"][row] == len(x)
            np.testing.assert_allclose(payloads[-1]["ccvr-means"][row], x.mean(0), rtol=1e-12, atol=1e-12)
            expected = np.cov(x.T, ddof=1) if len(x) > 1 else np.zeros((d, d))
            np.testing.assert_allclose(payloads[-1]["ccvr-covariances"][row], expected, rtol=1e-10, atol=1e-12)
    features = np.concatenate([f for f, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    combined = combine_moments(payloads)
    assert sorted(combined) == [0, 1, 2]
    for c, (total, mean, covariance) in combined.items():
        x = features[labels == c]
        assert total == len(x)
        np.testing.assert_allclose(mean, x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(covariance, np.cov(x.T, ddof=1), rtol=1e-10, atol=1e-12)


def test_moments_from_the_clients_summed_class_sums_equal_the_pooled_moments() -> None:
    """Under secure aggregation the server sees only Σ_k of each client's (count, Σx, Σxxᵀ) per class: the
    Gaussians it draws from must be those of the paper's pooling of the clients' moments."""
    rng = np.random.default_rng(1)
    d, classes = 5, 6
    held = [{0: 7, 1: 1}, {0: 3, 2: 5}, {0: 12, 1: 4, 3: 1}]  # class 3: one sample in the federation; 4+: nobody
    payloads, summed = [], None
    for k, counts in enumerate(held):
        labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
        features = rng.normal(loc=3 * k + labels[:, None], scale=2.0 + k, size=(len(labels), d))
        payloads.append(class_moments(torch.from_numpy(features), torch.from_numpy(labels), classes))
        sums = class_sums(torch.from_numpy(features), torch.from_numpy(labels), classes)
        assert sums["ccvr-count"].tolist() == [counts.get(c, 0) for c in range(classes)]  # dense: a zero row if absent
        assert sums["ccvr-outer-sum"].shape == (classes, d, d) and not sums["ccvr-feature-sum"][4:].any()
        summed = sums if summed is None else {key: summed[key] + v for key, v in sums.items()}
    pooled, from_sums = combine_moments(payloads), moments_from_sums(summed)
    assert sorted(from_sums) == sorted(pooled) == [0, 1, 2, 3]
    for c, (total, mean, covariance) in pooled.items():
        assert from_sums[c][0] == total
        np.testing.assert_allclose(from_sums[c][1], mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(from_sums[c][2], covariance, rtol=1e-9, atol=1e-10)
    assert not from_sums[3][2].any()  # one sample: zero covariance, as the pooled path


def test_a_class_seen_once_in_the_federation_has_zero_covariance() -> None:
    payload = class_moments(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0, 1]), 2)
    combined = combine_moments([payload])
    np.testing.assert_array_equal(combined[1][1], [3.0, 4.0])
    np.testing.assert_array_equal(combined[1][2], np.zeros((2, 2)))


def test_virtual_features_have_the_target_moments() -> None:
    """At seed 0, 20 000 draws: mean within 0.05 and covariance within 0.1 (entries of size ~1-2)."""
    mean = np.array([1.0, -2.0, 0.5])
    a = np.array([[1.0, 0.3, 0.0], [0.0, 1.2, -0.4], [0.2, 0.0, 0.8]])
    covariance = a @ a.T
    draws = sample_gaussian(mean, covariance, 20_000, torch.Generator().manual_seed(0)).numpy()
    assert draws.shape == (20_000, 3)
    np.testing.assert_allclose(draws.mean(0), mean, atol=0.05)
    np.testing.assert_allclose(np.cov(draws.T), covariance, atol=0.1)
    # rank-deficient Σ (as with fewer samples than dimensions): draws stay in mean + span(Σ), no NaN
    direction = np.array([1.0, 1.0, 0.0]) / math.sqrt(2)
    flat = sample_gaussian(mean, 4.0 * np.outer(direction, direction), 2_000, torch.Generator().manual_seed(1))
    offsets = flat.numpy() - mean
    np.testing.assert_allclose(offsets - np.outer(offsets @ direction, direction), 0.0, atol=1e-9)
    assert np.std(offsets @ direction) == pytest.approx(2.0, rel=0.1)


def ccvr_server(**overrides) -> tuple[CCVRServer, torch.nn.Module]:  # type: ignore[no-untyped-def]
    images, labels = images_labels([5, 5, 5])
    model = linear_model(seed=11)
    return CCVRServer(ccvr_config(**overrides), model, federated(images, labels, [np.arange(15)])), model


def client_reports(model, cfg) -> list[ClientReport]:  # type: ignore[no-untyped-def]
    reports = []
    for k, counts in enumerate(([20, 12, 0], [0, 9, 25])):
        images, labels = images_labels(counts, seed=30 + k)
        payload = CCVRClient(cfg, C, {}).statistics(copy.deepcopy(model), images, labels, FP32)
        reports.append(ClientReport(k, 0, payload))
    return reports


def test_client_statistics_are_the_moments_of_the_global_encoders_features() -> None:
    cfg = ccvr_config()
    model = linear_model(seed=3)
    images, labels = images_labels([6, 1, 4], seed=5)
    payload = CCVRClient(cfg, C, {}).statistics(model, images, labels, FP32)
    h, y = features_of(images), labels.numpy()  # fmnist: un-augmented pixels / 255
    assert payload["ccvr-classes"].tolist() == [0, 1, 2]
    for row, c in enumerate([0, 1, 2]):
        np.testing.assert_allclose(payload["ccvr-means"][row], h[y == c].mean(0), rtol=1e-5, atol=1e-6)
        expected = np.cov(h[y == c].T, ddof=1) if (y == c).sum() > 1 else np.zeros((D, D))
        np.testing.assert_allclose(payload["ccvr-covariances"][row], expected, rtol=1e-4, atol=1e-6)


def test_calibration_changes_only_the_classifier_and_only_for_evaluation() -> None:
    server, model = ccvr_server()
    before = copy.deepcopy(model.state_dict())
    reports = client_reports(model, server.cfg)
    server.absorb(1, [])
    assert server.evaluation_model(model) is model  # not calibrated yet this round
    server.absorb_statistics(1, model, reports)
    evaluated = server.evaluation_model(model)
    assert evaluated is not model
    for key, value in model.state_dict().items():  # the global model that keeps training is untouched
        assert torch.equal(value, before[key]), key
    for key, value in evaluated.state_dict().items():
        if key.startswith("classifier."):
            assert not torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), key
    # re-trained from the global classifier on virtual features of the combined statistics: they now fit better
    statistics = combine_moments([r.payload for r in reports])
    features, labels = server.virtual_features(statistics)  # fresh draws from the same Gaussians
    with torch.no_grad():
        loss_before = F.cross_entropy(model.classifier(features), labels)
        loss_after = F.cross_entropy(evaluated.classifier(features), labels)
    assert float(loss_after) < float(loss_before)
    assert math.isfinite(server.round_metrics()["ccvr_retrain_loss"])
    server.absorb(2, [])  # the next global model: the old calibration no longer applies
    assert server.evaluation_model(model) is model


def test_final_calibrates_only_the_last_round() -> None:
    every, _ = ccvr_server()
    final, _ = ccvr_server(**{"ccvr-calibrate": "final"})
    assert [every.wants_statistics(r) for r in (1, 2, 3)] == [True, True, True]
    assert [final.wants_statistics(r) for r in (1, 2, 3)] == [False, False, True]


def test_ccvr_runs_through_the_apps_with_the_statistics_query(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    code = run_in_process(
        tmp_path, monkeypatch,
        "method='ccvr' num-server-rounds=2 samples-per-class=30 imbalance-ratio=10.0 ccvr-virtual-per-class=50 "
        f"ccvr-retrain-epochs=2 output-dir='{tmp_path / 'out'}' run-name='ccvr' wandb-mode='disabled'",
        num_clients=2,
    )
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "ccvr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["ccvr_retrain_loss"])  # calibrated before each evaluation
        assert math.isfinite(row["accuracy"])

    # final_model.pt is the network round 2 was measured on: the calibrated head, not the aggregated one
    run_dir = tmp_path / "out" / "ccvr"
    model, cfg = trained_model(run_dir)
    assert not model.training
    global_head = load_checkpoint(run_dir)["arrays"]["classifier.weight"]
    assert not np.allclose(model.classifier.weight.detach().numpy(), global_head)
    data = federated_data(cfg, 2)
    result = evaluate(model, *data.test_data(), cfg.dataset, tail_classes(data.class_counts), data.class_counts)
    assert result.accuracy == rows[-1]["accuracy"]
    assert result.tail_accuracy == rows[-1]["tail_accuracy"]


def test_ccvr_under_secure_aggregation_calibrates_on_the_same_gaussians(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A secure run's statistics query is a second masked instance: the server's per-class Gaussians are the
    pooled moments of exactly what the clients summed (up to the fixed-point steps), and equal a plain run's,
    so both calibrate alike.

    fp32 on purpose: the secure run's global model differs from the plain one's by the train codec's steps,
    which bf16 features could turn into whole bf16 steps on one machine and not on another."""
    calibrations = record_calls(monkeypatch, CCVRServer, "calibrate")
    answers = record_calls(monkeypatch, CCVRClient, "statistics_summands")  # what the secure run's clients masked
    runs = run_off_and_secagg(tmp_path, monkeypatch, "method='ccvr' num-server-rounds=2 samples-per-class=30 "
                              "imbalance-ratio=10.0 ccvr-virtual-per-class=50 ccvr-retrain-epochs=2 precision='fp32'",
                              run_name="ccvr")
    seen = {mode: [call.args[1] for call in calibrations if call.instance.cfg.secure_aggregation == mode]
            for mode in ("off", "secagg")}  # calibrate(global_model, statistics)
    summands = [call.result for call in answers]
    assert len(seen["off"]) == len(seen["secagg"]) == 2  # every round calibrated, in both runs
    assert len(summands) == 2 * 3  # every client answered both rounds' queries
    for round_index, secure in enumerate(seen["secagg"]):
        exact = moments_from_sums({k: sum(s[k] for s in summands[3 * round_index:3 * round_index + 3])
                                   for k in summands[0]})
        assert sorted(exact) == sorted(secure)
        for c, (total, mean, covariance) in exact.items():
            assert secure[c][0] == total
            np.testing.assert_allclose(secure[c][1], mean, rtol=0, atol=3 * 2.0**-16)
            step = 3 * 2.0**-16 * (1 + np.abs(mean).max() ** 2)
            np.testing.assert_allclose(secure[c][2], covariance, rtol=1e-6, atol=step)
    for plain, secure in zip(seen["off"], seen["secagg"], strict=True):
        assert sorted(plain) == sorted(secure)
        for c, (total, mean, covariance) in plain.items():
            assert secure[c][0] == total
            np.testing.assert_allclose(secure[c][1], mean, rtol=0, atol=3 * 2.0**-16)
            step = 3 * 2.0**-16 * (1 + np.abs(mean).max() ** 2)  # codec steps, through Σxxᵀ − Nμμᵀ
            np.testing.assert_allclose(secure[c][2], covariance, rtol=1e-6, atol=step)
    off = [json.loads(x) for x in (runs["off"] / "metrics.jsonl").read_text().splitlines()]
    secure = [json.loads(x) for x in (runs["secagg"] / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["ccvr_retrain_loss"]) for r in secure)
    assert all(s["bytes_up"] > 0 for s in secure)
    # the secure run's model average is the plain one up to the codec, so round 1's calibrated accuracies agree
    assert abs(secure[0]["accuracy"] - off[0]["accuracy"]) < 0.05
