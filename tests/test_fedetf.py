"""FedETF: the fixed simplex-ETF classifier, the balanced loss, the personal fine-tuning, personalised accuracy.

Expected values are computed here in numpy from the models' weights or from
hand-built cases (never read back from the code under test). The ClientApp's
train handler is called in process for the reply's contents; one run goes
through the real apps (in process).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from in_process import run_in_process
from torch import Tensor, nn

from fedlt_app import client_app
from fedlt_app.config import ConfigError, resolve
from fedlt_app.methods import get_method
from fedlt_app.methods.fixed_classifier.fedetf import (
    FINE_TUNE,
    FedETFClient,
    FedETFServer,
    add_etf_classifier,
    simplex_etf,
)
from fedlt_app.models import EncoderClassifier, build_model
from fedlt_app.personalised import label_distribution, personalised_accuracy
from fedlt_app.records import content_parameters
from fedlt_app.strategy import RoundLog
from fedlt_app.task import federated_data, initial_model
from fedlt_app.train import LocalTraining, train_locally

C, D = 4, 6  # classes; pixels of a (1, 1, D) image = the toy backbone's feature width


def toy_model(seed: int) -> EncoderClassifier:
    """Backbone h = the D pixels; FedETF's head on top: μ = normalise(P h + b), logits = β μ M."""
    torch.manual_seed(seed)
    return add_etf_classifier(EncoderClassifier(nn.Sequential(nn.Flatten()), D, C))


def np_logits(model: EncoderClassifier, x: Tensor) -> np.ndarray:
    """β · normalise(P h + b) · M in float64 numpy, from the model's weights and its ETF."""
    w = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    h = x.numpy().reshape(len(x), -1).astype(np.float64)
    z = h @ w["encoder.projection.weight"].T + w["encoder.projection.bias"]
    mu = z / np.linalg.norm(z, axis=1, keepdims=True)
    etf = model.classifier.etf.detach().numpy().astype(np.float64)
    return w["classifier.temperature"][0] * mu @ etf


def np_ce(logits: np.ndarray, y: np.ndarray) -> float:
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def fedetf_cfg(**extra: object):  # type: ignore[no-untyped-def]
    return resolve({"method": "fedetf", "device": "cpu", "precision": "fp32", **extra})


# ---------------------------------------------------------------- the ETF


@pytest.mark.parametrize(("dim", "classes"), [(10, 10), (16, 5), (100, 100)])
def test_etf_columns_are_unit_and_equiangular(dim: int, classes: int) -> None:
    m = simplex_etf(dim, classes, torch.Generator().manual_seed(3)).double().numpy()
    assert m.shape == (dim, classes)
    norms = np.sqrt((m * m).sum(axis=0))
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)
    cosines = [float(m[:, i] @ m[:, j]) / (norms[i] * norms[j]) for i in range(classes) for j in range(classes)
               if i != j]
    np.testing.assert_allclose(cosines, -1.0 / (classes - 1), atol=1e-6)
    np.testing.assert_allclose(m.sum(axis=1), 0.0, atol=1e-6)  # a simplex: the columns sum to the origin


def test_every_node_builds_the_same_etf_and_it_never_travels() -> None:
    a, b = toy_model(0), toy_model(1)  # different seeds: different projections, the same ETF
    assert torch.equal(a.classifier.etf, b.classifier.etf)
    assert not torch.equal(a.encoder.projection.weight, b.encoder.projection.weight)
    travelling = a.travelling_state()
    assert "classifier.etf" not in travelling and "classifier.temperature" in travelling
    assert set(travelling) == {"encoder.projection.weight", "encoder.projection.bias", "classifier.temperature"}


def test_a_simplex_etf_needs_as_many_dimensions_as_classes() -> None:
    with pytest.raises(ValueError, match="dim >= 5"):
        simplex_etf(4, 5, torch.Generator())


# ---------------------------------------------------------------- the loss


def test_balanced_loss_on_a_hand_built_case() -> None:
    model = toy_model(0)
    with torch.no_grad():
        model.classifier.temperature.fill_(2.5)
    x = torch.randn(5, 1, 1, D, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 1, 1, 3])
    client_labels = torch.tensor([0, 1, 1, 1, 1, 1, 1, 3])  # class 2 absent: counted as 1, as the official code
    client = FedETFClient(fedetf_cfg(), C, {})
    client.begin(model, torch.zeros(8, 1, 1, D, dtype=torch.uint8), client_labels, torch.Generator())
    expected = np_ce(np_logits(model, x) + np.log([1.0, 6.0, 1.0, 1.0]), y.numpy())
    assert float(client.loss(model, x, y).detach()) == pytest.approx(expected, rel=1e-5)
    # the same hand-built case without the model: logits 0 everywhere -> −log(n_y / Σ n)
    assert float(nn.functional.cross_entropy(torch.zeros(1, C) + client.log_counts, torch.tensor([1]))) == \
        pytest.approx(-np.log(6.0 / 9.0), rel=1e-6)


def test_training_never_changes_the_etf_but_moves_projection_and_temperature() -> None:
    model = toy_model(0)
    etf = model.classifier.etf.clone()
    before = {k: v.clone() for k, v in model.travelling_state().items()}
    images = torch.randint(0, 256, (32, 1, 1, D), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(32) % C
    cfg = fedetf_cfg(**{"local-lr": 0.5})
    train_locally(model, images, labels, FedETFClient(cfg, C, {}), LocalTraining.from_config(cfg),
                  torch.Generator().manual_seed(0))
    assert torch.equal(model.classifier.etf, etf)
    for key, value in model.travelling_state().items():
        assert not torch.equal(value, before[key]), key


# ---------------------------------------------------------------- personal fine-tuning


def test_fine_tuning_moves_only_the_etf_and_projection_of_a_copy() -> None:
    model = toy_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    etf = model.classifier.etf.clone()
    cfg = fedetf_cfg(**{"fedetf-finetune-rounds": 2, "fedetf-finetune-epochs": 1})
    client = FedETFClient(cfg, C, {FINE_TUNE: np.ones(1, dtype=np.int8)})
    images = torch.randint(0, 256, (16, 1, 1, D), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    client.begin(model, images, torch.arange(16) % C, torch.Generator().manual_seed(0))
    personal = client.personalised_model(model)
    assert personal is not None and personal is not model
    for key, value in model.state_dict().items():  # the model that travels is untouched
        assert torch.equal(value, before[key]), key
    assert torch.equal(model.classifier.etf, etf) and all(p.requires_grad for p in model.parameters())
    assert not torch.equal(personal.classifier.etf, etf)
    assert not torch.equal(personal.encoder.projection.weight, model.encoder.projection.weight)
    assert torch.equal(personal.classifier.temperature, model.classifier.temperature)  # β is not fine-tuned


def test_without_the_servers_request_the_personal_model_is_the_local_one() -> None:
    model = toy_model(0)
    client = FedETFClient(fedetf_cfg(), C, {})
    client.begin(model, torch.zeros(4, 1, 1, D, dtype=torch.uint8), torch.arange(4), torch.Generator())
    assert client.personalised_model(model) is model


@pytest.mark.parametrize(("when", "rounds_asked"), [("last-round", [3]), ("every-round", [1, 2, 3]), ("off", [])])
def test_server_asks_for_fine_tuning_in_the_configured_rounds(when: str, rounds_asked: list[int]) -> None:
    cfg = fedetf_cfg(**{"fedetf-finetune": when, "num-server-rounds": 3, "fedetf-temperature": 4.0,
                        "samples-per-class": 20})
    model = initial_model(cfg, federated_data(cfg, 2))
    server = FedETFServer(cfg, model, federated_data(cfg, 2))
    assert float(model.classifier.temperature[0]) == 4.0  # β₀ from the config, in the model sent in round 1
    assert [r for r in (1, 2, 3) if FINE_TUNE in server.broadcast(r, model)] == rounds_asked


def test_config_names_the_key_and_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match="fedetf-finetune: must be one of last-round, every-round, off"):
        fedetf_cfg(**{"fedetf-finetune": "final"})
    with pytest.raises(ConfigError, match="fedetf-temperature: must be > 0"):
        fedetf_cfg(**{"fedetf-temperature": 0.0})
    assert get_method("fedetf").client is FedETFClient


# ---------------------------------------------------------------- personalised accuracy


class KnownPredictions(EncoderClassifier):
    """Predicts the label written in pixel 0 for the classes in ``right``, class 0 for every other image."""

    def __init__(self, right: set[int]) -> None:
        super().__init__(nn.Flatten(), 1, C)
        self.right = right

    def forward(self, x: Tensor) -> Tensor:
        label = (x.flatten(1)[:, 0] * 255).round().long()
        guess = torch.where(torch.isin(label, torch.tensor(sorted(self.right))), label, torch.zeros_like(label))
        return nn.functional.one_hot(guess, C).float() * 5.0


def test_personalised_accuracy_weights_the_test_classes_by_the_clients_label_distribution() -> None:
    test_labels = torch.tensor([0] * 10 + [1] * 30 + [2] * 20 + [3] * 5)  # an imbalanced test split on purpose
    test_images = test_labels.to(torch.uint8).view(-1, 1, 1, 1)
    model = KnownPredictions(right={1, 3})  # class 0 also right (everything else falls to 0): acc = 1, 1, 0, 1
    client_labels = torch.tensor([0] * 2 + [1] * 5 + [2] * 3)  # p = 0.2, 0.5, 0.3, 0
    p = label_distribution(client_labels, C)
    np.testing.assert_allclose(p, [0.2, 0.5, 0.3, 0.0])
    assert personalised_accuracy(model, test_images, test_labels, p, "mnist") == pytest.approx(0.2 + 0.5)
    # a client holding only the wrong class scores 0; the plain test accuracy would be (10 + 30 + 5) / 65
    assert personalised_accuracy(model, test_images, test_labels, label_distribution(torch.tensor([2]), C),
                                 "mnist") == 0.0


def test_round_log_writes_the_mean_and_the_per_client_values_in_cohort_order() -> None:
    log = RoundLog(server_round=1, cohort=[0, 2, 5])
    assert log.personalised_metrics() == {}  # methods without a personal part write nothing
    log.personalised.update({5: 0.5, 0: 0.9})  # partition 2 failed
    assert log.personalised_metrics() == {"personalised_accuracy": pytest.approx(0.7),
                                          "personalised_accuracy_per_client": [0.9, None, 0.5]}


# ---------------------------------------------------------------- the ClientApp's reply

RUN_CONFIG = {"method": "fedetf", "samples-per-class": 20, "imbalance-ratio": 2.0, "device": "cpu",
              "precision": "fp32", "local-epochs": 1}


def test_the_train_reply_carries_the_model_without_the_etf_and_the_personalised_accuracy() -> None:
    cfg = resolve(RUN_CONFIG)
    data = federated_data(cfg, 2)
    start = initial_model(cfg, data).travelling_state()
    metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    message = Message(content=RecordDict({"arrays": ArrayRecord(start),
                                          "config": ConfigRecord({"server-round": 1})}), metadata=metadata)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config=dict(RUN_CONFIG))
    reply = client_app.train(message, context)
    assert set(reply.content["arrays"].keys()) == set(start)
    assert "classifier.etf" not in reply.content["arrays"]
    # cnn: its 1,199,882 parameters less the linear classifier (1,290), plus the projection Linear(128, 10)
    # (1,290) and β (1)
    expected_parameters = 1_199_882 - 1_290 + 1_290 + 1
    assert sum(v.numel() for v in start.values()) == expected_parameters
    assert content_parameters(reply.content) == expected_parameters
    accuracy = reply.content["metrics"]["personalised-accuracy"]
    assert 0.0 <= accuracy <= 1.0


def test_a_node_without_a_test_split_reports_no_personalised_accuracy() -> None:
    class LocalDataNode:  # a deployment node with its own data: an empty test split (fedlt_app/data/local.py)
        num_classes = C

        def test_data(self) -> tuple[Tensor, Tensor]:
            return torch.empty((0, 1, 1, D), dtype=torch.uint8), torch.empty((0,), dtype=torch.int64)

    metrics = MetricRecord({"num-examples": 4})
    node = LocalDataNode()
    client_app.report_personalised_accuracy(metrics, toy_model(0), node, torch.arange(4),  # type: ignore[arg-type]
                                            fedetf_cfg(), torch.device("cpu"))
    assert "personalised-accuracy" not in metrics


# ---------------------------------------------------------------- through the real apps (in process)


def test_fedetf_run_records_personalised_accuracy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = ("method='fedetf' samples-per-class=60 imbalance-ratio=10.0 num-server-rounds=2 "
              "fedetf-finetune-rounds=1 fedetf-finetune-epochs=1 "
              f"output-dir='{tmp_path / 'out'}' run-name='fedetf'")
    assert run_in_process(tmp_path, monkeypatch, config, num_clients=2) == 0
    run_dir = tmp_path / "out" / "fedetf"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    model = add_etf_classifier(build_model("cnn", 10, 1, 28))
    per_client = sum(v.numel() for v in model.travelling_state().values())
    for row in rows:
        assert row["parameters_up"] == row["parameters_down"] == 2 * per_client  # the ETF never travels
        assert len(row["personalised_accuracy_per_client"]) == len(row["clients"]) == 2
        assert row["personalised_accuracy"] == pytest.approx(np.mean(row["personalised_accuracy_per_client"]))
        assert row["fedetf_temperature"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final_personalised_accuracy"] == rows[-1]["personalised_accuracy"]
