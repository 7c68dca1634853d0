"""FedNH: prototype initialisation, the prototype classifier, client semantics, the server's smooth update.

Expected values are computed here in numpy from hand-built inputs or the
models' weights, never read back from the code under test. The server's
update is also checked through FedLTStrategy (the new global model carries the
server's prototypes) and end to end through the real apps (in process).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from in_process import run_in_process
from test_baselines import _reply
from torch import nn

from fedlt_app.config import resolve
from fedlt_app.methods import get_method
from fedlt_app.methods.base import ClientReport
from fedlt_app.methods.fixed_classifier.fednh import (
    COUNTS,
    PROTOTYPE_KEY,
    SCALED_MEANS,
    FedNHClient,
    FedNHServer,
    PrototypeClassifier,
    add_prototype_classifier,
    class_semantics,
    orthogonal_prototypes,
    smoothed_prototypes,
)
from fedlt_app.models import EncoderClassifier, build_model
from fedlt_app.strategy import FedLTStrategy, server_optimizer
from fedlt_app.train import LocalTraining, train_locally

C, D = 3, 4


def np_unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def toy_model(seed: int = 0) -> EncoderClassifier:
    """h = the D pixels; FedNH's head on top."""
    torch.manual_seed(seed)
    return add_prototype_classifier(EncoderClassifier(nn.Flatten(), D, C))


def fednh_cfg(**extra: object):  # type: ignore[no-untyped-def]
    return resolve({"method": "fednh", **extra})


# ---------------------------------------------------------------- initialisation and classifier


@pytest.mark.parametrize(("classes", "dim"), [(10, 128), (10, 10), (3, 64)])
def test_prototypes_start_orthonormal_as_the_code_draws_them(classes: int, dim: int) -> None:
    torch.manual_seed(4)
    got = orthogonal_prototypes(classes, dim).double().numpy()
    np.testing.assert_allclose(got @ got.T, np.eye(classes), atol=1e-5)  # unit rows, every pair at 90 degrees
    torch.manual_seed(4)  # the official recipe, FedUH._initialize_model: orthogonal_(rand(m, n))
    np.testing.assert_allclose(got, nn.init.orthogonal_(torch.rand(classes, dim)).double().numpy(), atol=1e-6)


def test_more_classes_than_dimensions_still_gives_unit_prototypes() -> None:
    torch.manual_seed(0)
    got = orthogonal_prototypes(12, 5).double().numpy()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.ones(12), atol=1e-6)


def test_classifier_is_scale_times_cosine_with_frozen_prototypes() -> None:
    model = toy_model(1)
    head = model.classifier
    assert isinstance(head, PrototypeClassifier)
    assert not head.prototype.requires_grad and head.scale.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.scale"]
    with torch.no_grad():
        head.scale.fill_(2.5)
    h = torch.randn(6, 1, 1, D, generator=torch.Generator().manual_seed(0))
    p = head.prototype.detach().double().numpy()
    expected = 2.5 * np_unit(h.reshape(6, D).double().numpy()) @ p.T
    np.testing.assert_allclose(model(h).detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_initial_scale_follows_the_codes_backbone() -> None:
    assert float(get_method("fednh").extend_model(build_model("cnn", 10, 1, 28)).classifier.scale.detach()) == 1.0
    resnet = get_method("fednh").extend_model(build_model("resnet56", 10, 3, 32))
    assert float(resnet.classifier.scale.detach()) == 20.0
    assert tuple(resnet.classifier.prototype.shape) == (10, resnet.feature_dim)


# ---------------------------------------------------------------- client semantics


def test_class_semantics_are_count_times_the_normalised_mean_of_normalised_features() -> None:
    features = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 2, 2])
    scaled, counts = class_semantics(features, labels, 4)
    mean0 = np_unit(np.array([0.6, 0.8]) + np.array([0.0, 1.0]))  # normalised features, then their mean
    mean2 = np_unit(np.array([1.0, 0.0]) + np_unit(np.array([5.0, 5.0])))
    np.testing.assert_allclose(counts, [2, 0, 2, 0])
    np.testing.assert_allclose(scaled, [2 * mean0, [0, 0], 2 * mean2, [0, 0]], atol=1e-12)


def test_client_reports_the_trained_models_semantics_and_is_its_own_personal_model() -> None:
    model = toy_model(2)
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (12, 1, 1, D), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0])  # class 2 absent
    client = FedNHClient(fednh_cfg(precision="fp32"), C, {})
    setup = LocalTraining(epochs=2, batch_size=5, lr=0.5, momentum=0.0, grad_clip=0.0, prox_mu=0.0, dataset="fmnist")
    received = model.classifier.prototype.detach().clone()
    train_locally(model, images, labels, client, setup, torch.Generator().manual_seed(1))
    assert torch.equal(model.classifier.prototype, received)  # clients never move the prototypes
    report = client.report()
    h = images.reshape(12, D).double().numpy() / 255.0  # the toy encoder's features of un-augmented images
    for c, n in ((0, 8), (1, 4)):
        expected = n * np_unit(np_unit(h[labels.numpy() == c]).mean(axis=0))
        np.testing.assert_allclose(report[SCALED_MEANS][c], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(report[COUNTS], [8, 4, 0])
    np.testing.assert_array_equal(report[SCALED_MEANS][2], np.zeros(D))
    assert client.personalised_model(model) is model


# ---------------------------------------------------------------- the server


def hand_built_round() -> tuple[np.ndarray, list[ClientReport], np.ndarray]:
    """Prototypes at 0/90/180 degrees; two clients, class 2 held by nobody; the update computed by hand."""
    prototypes = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    means_a = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # unit class means of client A
    means_b = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    counts_a, counts_b = np.array([3.0, 2.0, 0.0]), np.array([1.0, 0.0, 0.0])
    reports = [ClientReport(0, 5, {SCALED_MEANS: means_a * counts_a[:, None], COUNTS: counts_a.astype(np.int64)}),
               ClientReport(1, 1, {SCALED_MEANS: means_b * counts_b[:, None], COUNTS: counts_b.astype(np.int64)})]
    rho = 0.9
    avg0 = np_unit((3 * np.array([0.0, 1.0]) + 1 * np.array([1.0, 0.0])) / 4)  # (1, 3)/√10
    avg1 = np.array([1.0, 0.0])
    expected = np.array([np_unit(rho * prototypes[0] + (1 - rho) * avg0),
                         np_unit(rho * prototypes[1] + (1 - rho) * avg1),
                         prototypes[2]])  # nobody holds class 2: unchanged
    return prototypes, reports, expected


def test_smooth_update_on_a_hand_built_round() -> None:
    prototypes, reports, expected = hand_built_round()
    got = smoothed_prototypes(prototypes, [r.payload[SCALED_MEANS] for r in reports],
                              [r.payload[COUNTS].astype(np.float64) for r in reports], 0.9)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert np.degrees(np.arccos(got[0] @ prototypes[0])) < 10  # a small step towards the clients' semantics


def two_d_server(prototypes: np.ndarray, **cfg: object) -> FedNHServer:
    torch.manual_seed(0)
    model = add_prototype_classifier(EncoderClassifier(nn.Flatten(), 2, len(prototypes)))
    with torch.no_grad():
        model.classifier.prototype.copy_(torch.from_numpy(prototypes))
    return FedNHServer(fednh_cfg(**cfg), model, None)  # type: ignore[arg-type]


def test_server_overrides_the_global_prototypes_and_averages_unweighted() -> None:
    prototypes, reports, expected = hand_built_round()
    server = two_d_server(prototypes)
    assert server.aggregation_weights(1, reports) == [1.0, 1.0]  # the code: server_lr / num_participants
    server.absorb(1, reports)
    np.testing.assert_allclose(server.global_model_overrides(1)[PROTOTYPE_KEY], expected, atol=1e-6)
    assert server.round_metrics()["fednh_updated_classes"] == 2
    # rho = 1: the prototypes never move (FedUH's fixed head)
    fixed = two_d_server(prototypes, **{"fednh-smoothing": 1.0})
    fixed.absorb(1, reports)
    np.testing.assert_allclose(fixed.global_model_overrides(1)[PROTOTYPE_KEY], prototypes, atol=1e-7)


def test_server_state_survives_a_checkpoint_round_trip() -> None:
    prototypes, reports, _ = hand_built_round()
    server = two_d_server(prototypes)
    server.absorb(1, reports)
    saved = server.state_dict()
    restored = two_d_server(prototypes)  # a new run starts from the initial prototypes, then loads
    restored.load_state_dict(saved)
    np.testing.assert_array_equal(restored.global_model_overrides(2)[PROTOTYPE_KEY],
                                  server.global_model_overrides(2)[PROTOTYPE_KEY])
    server.absorb(2, reports)
    restored.absorb(2, reports)  # and both continue identically
    np.testing.assert_array_equal(restored.prototypes, server.prototypes)


def test_through_the_strategy_the_new_global_model_holds_the_servers_prototypes(task_identity) -> None:
    from unittest.mock import Mock

    prototypes, reports, expected = hand_built_round()
    server = two_d_server(prototypes)
    model = add_prototype_classifier(EncoderClassifier(nn.Flatten(), 2, 3))
    nodes = {0: 101, 1: 102}
    strategy = FedLTStrategy(server_optimizer("fedavgm", 1.0, 0.9, 0.01), server, model, nodes, 0, 0)
    grid = Mock()
    grid.get_node_ids.return_value = list(nodes.values())
    current = {PROTOTYPE_KEY: prototypes.astype(np.float32), "classifier.scale": np.array([1.0], np.float32)}
    strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in current.items()}), ConfigRecord(), grid)
    client_arrays = [{PROTOTYPE_KEY: prototypes.astype(np.float32), "classifier.scale": np.array([s], np.float32)}
                     for s in (2.0, 5.0)]
    replies = [_reply(101 + k, a, r.num_examples, r.payload) for k, (a, r) in enumerate(zip(client_arrays, reports))]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays[PROTOTYPE_KEY].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(arrays["classifier.scale"].numpy(), [3.5], rtol=1e-6)  # unweighted: 5 vs 1 samples
    # FedAvgM keeps the overridden record as its current arrays: the next round starts from these prototypes
    np.testing.assert_allclose(strategy.inner.current_arrays[PROTOTYPE_KEY].numpy(), expected, atol=1e-6)


def test_bad_fednh_smoothing_fails_naming_the_key() -> None:
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fednh-smoothing"):
            fednh_cfg(**{"fednh-smoothing": bad})


# ---------------------------------------------------------------- through the real apps (in process)


def test_fednh_runs_two_rounds_and_checkpoints_its_prototypes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "out" / "fednh"
    code = run_in_process(tmp_path, monkeypatch, f"method='fednh' samples-per-class=60 imbalance-ratio=10.0 "
                          f"num-server-rounds=2 checkpoint-every=1 output-dir='{tmp_path / 'out'}' run-name='fednh'",
                          num_clients=2)
    assert code == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["fednh_updated_classes"] == 10 for r in rows)
    assert all(0.0 <= r["personalised_accuracy"] <= 1.0 for r in rows)
    assert all(len(r["personalised_accuracy_per_client"]) == 2 for r in rows)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    server_prototypes = np.asarray(checkpoint["method"]["prototypes"])
    model_prototypes = np.asarray(checkpoint["arrays"][PROTOTYPE_KEY], dtype=np.float64)
    np.testing.assert_array_equal(model_prototypes, server_prototypes)  # the global model carries the server's
    np.testing.assert_allclose(np.linalg.norm(server_prototypes, axis=1), np.ones(10), atol=1e-6)
