"""RUCR's defining rules, each against an independent numpy computation.

Global prototypes are the pooled class means of the cohort's features and the norm-means the count-weighted
mean of normalised client means; the balanced prototype loss; mixed features on the segment between a
norm-mean and a normalised own feature; rectification only in the official last crt_ep + 1 rounds, from the
trained classifier, averaged by sample count for evaluation only; one run through the real apps (in process).
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

from fedlt_app.config import ConfigError, resolve
from fedlt_app.methods.base import ClientReport
from fedlt_app.methods.class_sums import summed
from fedlt_app.methods.decoupled import rucr
from fedlt_app.methods.decoupled.rucr import (
    RUCRClient,
    RUCRServer,
    balanced_prototype_loss,
    class_means,
    means_segments,
    means_summands,
    mixed_features,
    normalised_means,
    prototypes_from_sums,
    rectified_segments,
    rectified_summands,
    unified_prototypes,
)
from fedlt_app.precision import FP32


def rucr_config(**overrides):  # type: ignore[no-untyped-def]
    base = {"method": "rucr", "num-server-rounds": 5, "rucr-crt-rounds": 1, "rucr-crt-epochs": 3,
            "rucr-crt-features-per-class": 7, "rucr-crt-batch-size": 4, "precision": "fp32"}
    return resolve({**base, **overrides})


def client_statistics(cfg, model, counts_per_client):  # type: ignore[no-untyped-def]
    """Each client's statistics answer on ``model``, and its raw (features, labels) for the reference."""
    payloads, raw = [], []
    for k, counts in enumerate(counts_per_client):
        images, labels = images_labels(counts, seed=40 + k)
        payloads.append(RUCRClient(cfg, C, {}).statistics(copy.deepcopy(model), images, labels, FP32))
        raw.append((features_of(images), labels.numpy()))
    return payloads, raw


def test_prototypes_are_pooled_means_and_norm_means_average_normalised_client_means() -> None:
    cfg = rucr_config()
    payloads, raw = client_statistics(cfg, linear_model(seed=2), [[5, 2, 0], [1, 0, 6], [4, 3, 0]])
    for payload, (h, y) in zip(payloads, raw, strict=True):  # each client: counts and means of its features
        for row, c in enumerate(payload["rucr-classes"].tolist()):
            assert payload["rucr-counts"][row] == (y == c).sum()
            np.testing.assert_allclose(payload["rucr-means"][row], h[y == c].mean(0), rtol=1e-6)
    h = np.concatenate([f for f, _ in raw])
    y = np.concatenate([t for _, t in raw])
    prototypes, counts = unified_prototypes(payloads, C, D)
    np.testing.assert_array_equal(counts, np.bincount(y, minlength=C))
    for c in range(C):
        np.testing.assert_allclose(prototypes[c], h[y == c].mean(0), rtol=1e-6)
    # two clients only, class 2 held by neither: a zero row, count 0
    prototypes, counts = unified_prototypes([payloads[0], payloads[2]], C, D)
    assert counts[2] == 0 and not prototypes[2].any()
    norm_means, held = normalised_means(payloads, C, D)
    assert held.all()
    for c in range(C):
        expected, total = np.zeros(D), 0
        for f, t in raw:
            if (t == c).any():
                mean = f[t == c].mean(0)
                expected += (t == c).sum() * mean / np.linalg.norm(mean)
                total += (t == c).sum()
        np.testing.assert_allclose(norm_means[c], expected / total, rtol=1e-6)


def reference_feature_loss(f, y, prototypes, held, ratio, t, times):  # type: ignore[no-untyped-def]
    unit_f = f / np.linalg.norm(f, axis=1, keepdims=True)
    norms = np.linalg.norm(prototypes, axis=1, keepdims=True)
    unit_p = np.divide(prototypes, norms, out=np.zeros_like(prototypes), where=norms > 0)
    logits = np.where(held[None, :], unit_f @ unit_p.T, 0.0) / t
    logits[np.arange(len(y)), y] += times * np.log(ratio[y])
    z = logits - logits.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def test_balanced_prototype_loss_matches_the_official_formula() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, D))
    y = np.array([0, 1, 0, 1, 1, 0])
    prototypes = rng.normal(size=(C, D))
    held = np.array([True, True, False])  # the client lacks class 2: its cosine is 0, not dropped
    ratio = np.array([0.5, 0.3, 0.2])
    got = balanced_prototype_loss(torch.from_numpy(f), torch.from_numpy(y), torch.from_numpy(prototypes),
                                  torch.from_numpy(held), torch.from_numpy(np.log(ratio)), 0.9, 1.5)
    assert float(got) == pytest.approx(reference_feature_loss(f, y, prototypes, held, ratio, 0.9, 1.5), rel=1e-10)


def test_client_adds_the_weighted_prototype_term_to_cross_entropy_and_only_with_prototypes() -> None:
    cfg = rucr_config(**{"rucr-feature-weight": 0.4, "rucr-temperature": 0.7})
    model = linear_model(seed=4)
    images, labels = images_labels([4, 3, 0], seed=9)  # no class 2 on this client
    rng = np.random.default_rng(1)
    prototypes = rng.normal(size=(C, D)).astype(np.float32)
    ratio = np.array([0.6, 0.1, 0.3])
    client = RUCRClient(cfg, C, {rucr.PROTOTYPES: prototypes, rucr.CLASS_RATIO: ratio})
    client.begin(model, images, labels, torch.Generator().manual_seed(0))
    x = images.float() / 255
    loss = client.loss(model, x, labels)
    h, y = features_of(images), labels.numpy()
    w, b = (p.detach().numpy().astype(np.float64) for p in (model.classifier.weight, model.classifier.bias))
    logits = h @ w.T + b
    z = logits - logits.max(1, keepdims=True)
    ce = float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))
    feature = reference_feature_loss(h, y, prototypes.astype(np.float64), np.array([True, True, False]), ratio,
                                     0.7, 1.0)
    assert float(loss.detach()) == pytest.approx(ce + 0.4 * feature, rel=1e-5)
    plain = RUCRClient(cfg, C, {})  # round 1: no prototypes, cross-entropy alone
    plain.begin(model, images, labels, torch.Generator().manual_seed(0))
    assert float(plain.loss(model, x, labels).detach()) == pytest.approx(ce, rel=1e-5)
    plain.finish(model)
    assert set(plain.report()) == {rucr.FEATURE_LOSS}  # nothing rectified outside rectification rounds


def test_mixed_features_lie_between_the_norm_mean_and_a_normalised_own_feature() -> None:
    rng = np.random.default_rng(3)
    norm_means = torch.from_numpy(rng.normal(size=(C, D)))
    own = torch.from_numpy(rng.normal(size=(3, D)))  # fewer own features than per class: cycled
    unit = (own / own.norm(dim=1, keepdim=True)).numpy()
    features, labels = mixed_features(norm_means, [0, 2], own, 5, 0.35, 0.95, torch.Generator().manual_seed(0))
    assert labels.tolist() == [0] * 5 + [2] * 5
    picked = []
    for row, c in zip(features.numpy(), labels.tolist(), strict=True):
        m = norm_means[c].numpy()
        fits = []
        for i, u in enumerate(unit):  # row = lam m + (1 - lam) u for one own feature u, lam on a 0.01 grid
            lam = float(np.dot(row - u, m - u) / np.dot(m - u, m - u))
            if np.allclose(row, lam * m + (1 - lam) * u, atol=1e-9):
                fits.append((i, lam))
        assert len(fits) == 1
        i, lam = fits[0]
        assert 0.35 - 1e-9 <= lam <= 0.95 + 1e-9 and lam * 100 == pytest.approx(round(lam * 100))
        picked.append(i)
    for block in (picked[:5], picked[5:]):  # per class a fresh permutation of the own features, cycled
        assert sorted(block[:3]) == [0, 1, 2] and block[3:] == block[:2]


def rectifying_client(cfg, model, images, labels, norm_means, held):  # type: ignore[no-untyped-def]
    payload = {rucr.PROTOTYPES: np.zeros((C, D), np.float32), rucr.CLASS_RATIO: np.full(C, 1 / C),
               rucr.NORM_MEANS: norm_means, rucr.NORM_HOLDERS: held}
    client = RUCRClient(cfg, C, payload)
    client.begin(model, images, labels, torch.Generator().manual_seed(5))
    return client


def test_rectification_retrains_a_copy_of_the_trained_classifier_on_the_mixed_features() -> None:
    model = linear_model(seed=6)
    before = copy.deepcopy(model.state_dict())
    images, labels = images_labels([3, 4, 2], seed=2)
    norm_means = np.random.default_rng(2).normal(size=(C, D)).astype(np.float32)
    held = np.array([True, False, True])
    unchanged = rectifying_client(rucr_config(**{"rucr-crt-epochs": 0}), model, images, labels, norm_means, held)
    unchanged.finish(model)  # zero epochs: the trained classifier itself (official local_crt from the local head)
    np.testing.assert_array_equal(unchanged.report()[rucr.WEIGHT], before["classifier.weight"].numpy())
    cfg = rucr_config(**{"rucr-crt-epochs": 30, "rucr-crt-lr": 0.5})
    client = rectifying_client(cfg, model, images, labels, norm_means, held)
    client.finish(model)
    for key, value in model.state_dict().items():  # the model the client sends is untouched
        assert torch.equal(value, before[key]), key
    report = client.report()
    # the re-trained head separates fresh mixed features of classes 0 and 2 better than the trained one
    features, targets = mixed_features(torch.from_numpy(norm_means), [0, 2],
                                       torch.from_numpy(features_of(images)).float(), 50, 0.35, 0.95,
                                       torch.Generator().manual_seed(9))
    trained = features.numpy() @ before["classifier.weight"].numpy().T + before["classifier.bias"].numpy()
    rectified = features.numpy() @ report[rucr.WEIGHT].T + report[rucr.BIAS]
    accuracy = [float(np.mean(s.argmax(1) == targets.numpy())) for s in (trained, rectified)]
    assert accuracy[1] > accuracy[0] and accuracy[1] >= 0.9


def test_server_schedule_prototypes_of_the_cohort_and_evaluation_only_rectification() -> None:
    cfg = rucr_config()  # 5 rounds, rucr-crt-rounds=1: rectification in rounds 4 and 5
    model = linear_model(seed=8)
    images, labels = images_labels([5, 5, 5])
    server = RUCRServer(cfg, model, federated(images, labels, [np.arange(5), np.arange(5, 10), np.arange(10, 15)]))
    server.begin_round(1, [0, 2])
    assert server.broadcast(1, model) == {}  # round 1: no statistics yet
    assert [server.wants_statistics(r) for r in range(1, 6)] == [True, True, True, True, False]
    payloads, _ = client_statistics(cfg, model, [[5, 2, 0], [1, 0, 6], [4, 3, 0]])
    server.absorb_statistics(1, model, [ClientReport(k, 0, p) for k, p in enumerate(payloads)])
    for server_round, rectify in ((2, False), (3, False), (4, True), (5, True)):
        server.begin_round(server_round, [0, 2])
        payload = server.broadcast(server_round, model)
        prototypes, counts = unified_prototypes([payloads[0], payloads[2]], C, D)  # the cohort only
        np.testing.assert_allclose(payload[rucr.PROTOTYPES], prototypes, rtol=1e-6)
        np.testing.assert_allclose(payload[rucr.CLASS_RATIO], counts / counts.sum())
        assert (rucr.NORM_MEANS in payload) is rectify
    norm_means, held = normalised_means(payloads, C, D)  # every client's
    np.testing.assert_allclose(payload[rucr.NORM_MEANS], norm_means, rtol=1e-6)
    np.testing.assert_array_equal(payload[rucr.NORM_HOLDERS], held)
    # absorb: the sample-weighted mean of the clients' rectified heads evaluates; the global model is untouched
    rng = np.random.default_rng(4)
    heads = [(rng.normal(size=(C, D)).astype(np.float32), rng.normal(size=C).astype(np.float32)) for _ in range(2)]
    server.absorb(5, [ClientReport(0, 10, {rucr.WEIGHT: heads[0][0], rucr.BIAS: heads[0][1]}),
                      ClientReport(2, 30, {rucr.WEIGHT: heads[1][0], rucr.BIAS: heads[1][1]})])
    before = copy.deepcopy(model.state_dict())
    evaluated = server.evaluation_model(model)
    np.testing.assert_allclose(evaluated.classifier.weight.detach().numpy(), 0.25 * heads[0][0] + 0.75 * heads[1][0],
                               rtol=1e-6)
    np.testing.assert_allclose(evaluated.classifier.bias.detach().numpy(), 0.25 * heads[0][1] + 0.75 * heads[1][1],
                               rtol=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert server.round_metrics()["rucr_rectified"] == 1
    server.absorb(6, [ClientReport(0, 10, {})])  # no rectified head this round: the global model evaluates
    assert server.evaluation_model(model) is model
    restored = RUCRServer(cfg, model, federated(images, labels, [np.arange(15)]))  # checkpoint round trip
    restored.load_state_dict(copy.deepcopy(server.state_dict()))
    restored.begin_round(4, [0, 2])
    for key, value in server.broadcast(4, model).items():
        np.testing.assert_array_equal(restored.broadcast(4, model)[key], value)


def test_rectification_rounds_follow_the_official_condition() -> None:
    assert [r for r in range(1, 11) if rucr.rectification_round(rucr_config(**{"num-server-rounds": 10,
                                                                              "rucr-crt-rounds": 2}), r)] == [8, 9, 10]
    assert [r for r in range(1, 11) if rucr.rectification_round(rucr_config(**{"num-server-rounds": 10,
                                                                              "rucr-crt-rounds": 0}), r)] == [10]
    with pytest.raises(ConfigError, match="rucr-mixup-low"):
        rucr_config(**{"rucr-mixup-low": 0.9, "rucr-mixup-high": 0.5})
    # secure aggregation: the masked sums run over every client, so only full participation is accepted
    assert rucr_config(**{"secure-aggregation": "secagg"}).secure_aggregation == "secagg"
    with pytest.raises(ConfigError, match=r"clients-per-round: .*got 2"):
        rucr_config(**{"secure-aggregation": "secagg", "clients-per-round": 2})


def test_class_means_of_an_empty_client_are_empty() -> None:
    payload = class_means(torch.zeros(0, D), torch.zeros(0, dtype=torch.long), C)
    assert payload["rucr-means"].shape == (0, D) and payload["rucr-classes"].size == 0


def test_rucr_runs_through_the_apps_with_the_statistics_query(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    code = run_in_process(
        tmp_path, monkeypatch,
        "method='rucr' num-server-rounds=2 samples-per-class=30 imbalance-ratio=10.0 rucr-crt-rounds=1 "
        "rucr-crt-epochs=2 rucr-crt-features-per-class=20 "
        f"output-dir='{tmp_path / 'out'}' run-name='rucr' wandb-mode='disabled'",
        num_clients=2,
    )
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "rucr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["rucr_rectified"] == 0  # round 1: no statistics yet, so neither prototypes nor rectification
    assert rows[1]["rucr_rectified"] == 1 and math.isfinite(rows[1]["rucr_feature_loss"])
    for row in rows:
        assert math.isfinite(row["accuracy"])


def test_secure_server_gets_the_plain_broadcast_and_head_from_sums() -> None:
    """Under secagg the server holds only sums over every client; with every client in the cohort its
    prototypes, class ratio, norm-means and evaluated head are the plain server's."""
    model = linear_model(seed=8)
    images, labels = images_labels([5, 5, 5])
    data = federated(images, labels, [np.arange(5), np.arange(5, 10), np.arange(10, 15)])
    plain, secure = RUCRServer(rucr_config(), model, data), RUCRServer(
        rucr_config(**{"secure-aggregation": "secagg"}), model, data)
    payloads, _ = client_statistics(rucr_config(), model, [[5, 2, 0], [1, 0, 6], [4, 3, 0]])
    plain.absorb_statistics(1, model, [ClientReport(k, 0, p) for k, p in enumerate(payloads)])
    secure.absorb_statistics_sums(1, model, summed(secure.statistics_sum_segments(),
                                                   (means_summands(p, C, D) for p in payloads)))
    for server_round in (2, 4):  # 4: a rectification round (norm-means too)
        plain.begin_round(server_round, [0, 1, 2])
        secure.begin_round(server_round, [0, 1, 2])
        expected, got = plain.broadcast(server_round, model), secure.broadcast(server_round, model)
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7)
    # a client lacking a class contributes a zero row and no count; the sums' prototypes are the pooled means
    terms = means_summands(payloads[0], C, D)
    assert terms["rucr-count-sum"].tolist() == [5, 2, 0] and not terms["rucr-mean-sum"][2].any()
    prototypes, counts = prototypes_from_sums(summed(means_segments(C, D), (means_summands(p, C, D)
                                                                             for p in payloads)))
    np.testing.assert_allclose(prototypes, unified_prototypes(payloads, C, D)[0])
    # the rectified heads: Σ n W / Σ n, a client without a head adds nothing; the loss metric is the mean
    rng = np.random.default_rng(4)
    heads = [(rng.normal(size=(C, D)).astype(np.float32), rng.normal(size=C).astype(np.float32)) for _ in range(2)]
    reports = [ClientReport(0, 10, {rucr.WEIGHT: heads[0][0], rucr.BIAS: heads[0][1],
                                    rucr.FEATURE_LOSS: np.array([0.5], np.float32)}),
               ClientReport(1, 30, {rucr.WEIGHT: heads[1][0], rucr.BIAS: heads[1][1],
                                    rucr.FEATURE_LOSS: np.array([1.5], np.float32)}),
               ClientReport(2, 50, {rucr.FEATURE_LOSS: np.array([np.nan], np.float32)})]
    plain.absorb(4, reports)
    secure.absorb_sums(4, summed(rectified_segments(C, D), (rectified_summands(r.payload, r.num_examples, C, D)
                                                            for r in reports)))
    np.testing.assert_allclose(secure.evaluation_model(model).classifier.weight.detach().numpy(),
                               0.25 * heads[0][0] + 0.75 * heads[1][0], rtol=1e-6)
    np.testing.assert_allclose(secure.evaluation_model(model).classifier.bias.detach().numpy(),
                               plain.evaluation_model(model).classifier.bias.detach().numpy(), rtol=1e-6)
    assert secure.round_metrics() == pytest.approx(plain.round_metrics()) == {"rucr_feature_loss": 1.0,
                                                                            "rucr_rectified": 1}
    secure.absorb_sums(5, summed(rectified_segments(C, D), [rectified_summands(reports[2].payload, 50, C, D)]))
    assert secure.evaluation_model(model) is model  # nobody rectified: the global model evaluates
    restored = RUCRServer(rucr_config(**{"secure-aggregation": "secagg"}), model, data)  # checkpoint round trip
    restored.load_state_dict(copy.deepcopy(secure.state_dict()))
    restored.begin_round(4, [0, 1, 2])
    for key, value in secure.broadcast(4, model).items():
        np.testing.assert_array_equal(restored.broadcast(4, model)[key], value)


def test_rucr_under_secure_aggregation_matches_a_plain_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real apps (in process): the secure run's prototypes are the pooled means of exactly what its
    clients masked (within the statistics codec's steps), and both runs rectify and score alike."""
    broadcasts = record_calls(monkeypatch, RUCRServer, "broadcast")
    answers = record_calls(monkeypatch, RUCRClient, "statistics_summands")
    runs = run_off_and_secagg(tmp_path, monkeypatch, "method='rucr' num-server-rounds=2 samples-per-class=30 "
                              "imbalance-ratio=10.0 rucr-crt-rounds=1 rucr-crt-epochs=2 rucr-crt-features-per-class=20 "
                              "precision='fp32'", run_name="rucr")
    sent = {mode: [call.result for call in broadcasts if call.instance.cfg.secure_aggregation == mode]
            for mode in ("off", "secagg")}
    answered = [call.result for call in answers]
    assert len(answered) == 3  # one masked query, after round 1, answered by every client
    exact = prototypes_from_sums({k: sum(a[k] for a in answered) for k in answered[0]})
    for plain, secure in zip(sent["off"], sent["secagg"], strict=True):
        assert sorted(plain) == sorted(secure)
    round2_plain, round2_secure = sent["off"][1], sent["secagg"][1]
    np.testing.assert_allclose(round2_secure[rucr.PROTOTYPES], exact[0], atol=3 * 2.0**-16)
    np.testing.assert_array_equal(round2_secure[rucr.CLASS_RATIO], exact[1] / exact[1].sum())
    # the two runs' global models differ by the train codec's steps only, so their statistics nearly agree
    for key in (rucr.PROTOTYPES, rucr.NORM_MEANS):
        np.testing.assert_allclose(round2_secure[key], round2_plain[key], atol=1e-3)
    rows = {mode: [json.loads(x) for x in (runs[mode] / "metrics.jsonl").read_text().splitlines()]
            for mode in ("off", "secagg")}
    assert [r["rucr_rectified"] for r in rows["secagg"]] == [r["rucr_rectified"] for r in rows["off"]] == [0, 1]
    for plain_row, secure_row in zip(rows["off"], rows["secagg"], strict=True):
        assert abs(secure_row["accuracy"] - plain_row["accuracy"]) < 0.05
        assert secure_row["rucr_feature_loss"] == pytest.approx(plain_row["rucr_feature_loss"], abs=1e-2, nan_ok=True)
