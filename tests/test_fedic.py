"""FedIC's defining rules, each against an independent numpy computation.

The held-out server split (never a client's image), the calibrated ensemble's formula, the weighted FedAvg
start of the refined and distilled models, the distillation loss (ld·KL at temperature T + (1 − ld)·CE), the
stage that trains only the calibration, and one run through the real apps (in process) (the distilled model becomes
the global model).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from in_process import run_in_process
from test_baselines import C, D, features_of, federated, images_labels, linear_model

from fedlt_app.config import ConfigError, resolve
from fedlt_app.methods.base import ClientReport
from fedlt_app.methods.distillation.fedic import CalibratedEnsemble, FedICServer, server_split, weighted_average


def fedic_config(**overrides):  # type: ignore[no-untyped-def]
    base = {"method": "fedic", "fedic-server-data": "heldout", "fedic-teach-per-class": 3, "fedic-steps": 4,
            "fedic-labeled-batch-size": 5, "fedic-unlabeled-batch-size": 6, "precision": "fp32"}
    return resolve({**base, **overrides})


def toy_federation():  # type: ignore[no-untyped-def]
    """30 images, 10 per class; the clients hold 12 of them (indices 0-11), the rest is held out."""
    images, labels = images_labels([10, 10, 10], seed=3)
    train = np.arange(12)
    return federated(images, labels, [np.arange(0, 6), np.arange(6, 12)], train_indices=train), images, labels


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_heldout_split_is_outside_every_client_and_fails_naming_the_keys_when_short() -> None:
    data, _, labels = toy_federation()
    labeled, unlabeled = server_split(data, 3)
    y = labels.numpy()
    outside = [i for i in range(30) if i >= 12]
    for c in range(C):
        assert labeled[y[labeled] == c].tolist() == [i for i in outside if y[i] == c][:3]  # first 3 per class
    assert sorted(labeled.tolist() + unlabeled.tolist()) == outside  # together exactly the held-out images
    assert not set(labeled) & set(unlabeled)
    everything = federated(*images_labels([4, 4, 4]), [np.arange(6), np.arange(6, 12)])  # every image on a client
    with pytest.raises(ValueError, match="fedic-server-data.*fedic-teach-per-class.*samples-per-class"):
        server_split(everything, 1)


def test_calibrated_ensemble_matches_the_official_formula() -> None:
    torch.manual_seed(0)
    ensemble = CalibratedEnsemble(C, D)
    with torch.no_grad():
        for p in ensemble.parameters():
            p.normal_()
    rng = np.random.default_rng(0)
    features = [rng.normal(size=(5, D)) for _ in range(3)]
    logits = [rng.normal(size=(5, C)) for _ in range(3)]
    refined = rng.normal(size=(5, C))
    got = ensemble([torch.from_numpy(f).float() for f in features], [torch.from_numpy(z).float() for z in logits],
                   torch.from_numpy(refined).float()).detach().numpy()
    a, b = (ensemble.ensemble_scale.detach().numpy().ravel(), float(ensemble.ensemble_bias.detach()))
    s, beta = ensemble.logit_scale.detach().numpy(), ensemble.logit_bias.detach().numpy()
    v, c0 = ensemble.gate.weight.detach().numpy().ravel(), float(ensemble.gate.bias.detach())
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    scores = np.stack([sigmoid(z @ a + b) for z in logits], axis=1)  # (5, K)
    w = scores / scores.sum(1, keepdims=True)
    calibrated = sum(w[:, k : k + 1] * z for k, z in enumerate(logits)) * s + beta
    gate = sigmoid(np.mean(features, axis=0) @ v + c0)[:, None]  # the clients' mean feature (1/K, not 1/8)
    np.testing.assert_allclose(got, gate * calibrated + (1 - gate) * refined, rtol=1e-5, atol=1e-6)


def fedic_server(cfg=None):  # type: ignore[no-untyped-def]
    data, images, labels = toy_federation()
    model = linear_model(seed=1)
    return FedICServer(cfg or fedic_config(), model, data), model, data


def client_reports(model, data):  # type: ignore[no-untyped-def]
    reports = []
    for k, n in enumerate((6, 18)):  # sample counts 6 and 18: FedAvg weights 1/4 and 3/4
        local = copy.deepcopy(model)
        with torch.no_grad():
            for p in local.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
        reports.append(ClientReport(k, n, {}, {key: v.numpy().copy() for key, v in local.state_dict().items()}))
    return reports


def client_models(model, reports):  # type: ignore[no-untyped-def]
    """The reports' models, frozen in eval mode, as the server builds them."""
    clients = []
    for r in reports:
        client = copy.deepcopy(model)
        client.load_state_dict({k: torch.from_numpy(v) for k, v in r.model.items()})
        clients.append(client.eval().requires_grad_(False))
    return clients


def test_server_starts_from_the_weighted_fedavg_and_its_distilled_model_replaces_the_aggregate() -> None:
    server, model, data = fedic_server(fedic_config(**{"fedic-lr": 1e-12}))  # (almost) no step: the start point
    reports = client_reports(model, data)
    server.absorb(1, reports)
    overrides = server.global_model_overrides(1)
    assert set(overrides) == set(model.state_dict())
    for key in overrides:
        expected = 0.25 * reports[0].model[key] + 0.75 * reports[1].model[key]
        np.testing.assert_allclose(overrides[key], expected, rtol=1e-6, atol=1e-7)
    states = [{k: torch.from_numpy(v) for k, v in r.model.items()} for r in reports]
    np.testing.assert_allclose(weighted_average(states, [6, 18])["classifier.weight"].numpy(),
                               0.25 * reports[0].model["classifier.weight"] + 0.75 * reports[1].model[
                                   "classifier.weight"], rtol=1e-6)


def test_calibration_stage_trains_only_the_ensemble() -> None:
    server, model, data = fedic_server()
    reports = client_reports(model, data)
    clients = client_models(model, reports)
    frozen = [copy.deepcopy(c.state_dict()) for c in clients] + [copy.deepcopy(server.refined.state_dict())]
    before = copy.deepcopy(server.ensemble.state_dict())
    server.fit_ensemble(clients)
    assert any(not torch.equal(v, before[k]) for k, v in server.ensemble.state_dict().items())
    for state, module in zip(frozen, [*clients, server.refined], strict=True):
        for key, value in module.state_dict().items():
            assert torch.equal(value, state[key]), key
    assert math.isfinite(server.round_metrics()["fedic_ensemble_loss"])


def test_distillation_loss_is_ld_kl_at_temperature_plus_one_minus_ld_cross_entropy() -> None:
    cfg = fedic_config(**{"fedic-steps": 1, "fedic-ld": 0.3, "fedic-temperature": 2.5})
    server, model, data = fedic_server(cfg)
    reports = client_reports(model, data)
    clients = client_models(model, reports)
    fedavg = weighted_average([c.state_dict() for c in clients], [6, 18])
    state = server.generator.get_state()
    server.distil(clients, fedavg)
    # the same draws: an unlabeled batch, then a labeled one (fmnist: no augmentation, no generator draws)
    g = torch.Generator()
    g.set_state(state)
    unlabeled = server.unlabeled[torch.randperm(len(server.unlabeled), generator=g)[:6]]
    pick = torch.randperm(len(server.labeled[1]), generator=g)[:5]
    images, y = server.labeled[0][pick], server.labeled[1][pick].numpy()
    w = {k: v.double().numpy() for k, v in fedavg.items()}
    h_u, h_l = features_of(unlabeled), features_of(images)
    student = h_u @ w["classifier.weight"].T + w["classifier.bias"]
    student_labeled = h_l @ w["classifier.weight"].T + w["classifier.bias"]
    with torch.no_grad():
        teacher = server.ensemble(*server._ensemble_inputs(clients, torch.from_numpy(h_u).float())).double().numpy()
    p_t, p_s = np_softmax(teacher / 2.5), np_softmax(student / 2.5)
    kl = float(np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1)))  # batchmean, no T² factor
    ce = float(np.mean(-np.log(np_softmax(student_labeled)[np.arange(len(y)), y])))
    assert server.round_metrics()["fedic_distill_loss"] == pytest.approx(0.3 * kl + 0.7 * ce, rel=1e-5)


def test_fedic_config_needs_server_data_and_refuses_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="fedic-server-data"):
        resolve({"method": "fedic"})
    with pytest.raises(ConfigError, match="secure-aggregation"):
        fedic_config(**{"secure-aggregation": "secagg"})


def test_fedic_runs_through_the_apps_on_heldout_server_data(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    code = run_in_process(
        tmp_path, monkeypatch,
        "method='fedic' fedic-server-data='heldout' num-server-rounds=2 samples-per-class=30 imbalance-ratio=10.0 "
        "fedic-steps=2 fedic-teach-per-class=10 fedic-unlabeled-batch-size=32 "
        f"output-dir='{tmp_path / 'out'}' run-name='fedic' wandb-mode='disabled'",
        num_clients=2,
    )
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "fedic" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["fedic_distill_loss"]) and math.isfinite(row["accuracy"])
