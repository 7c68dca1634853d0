"""FedLC: cross-entropy on logits calibrated by the client's own class counts, z_c − τ·n_c^(−1/4), or
(``fedlc-counts=federation``, FedLTLib's) by the federation's summed counts, which the clients report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from in_process import run_in_process
from test_secagg_e2e import secure_rows
from torch import nn
from torch.nn import functional as F

from fedlt_app.config import ConfigError, resolve
from fedlt_app.methods import METHODS, ClientReport, get_method
from fedlt_app.methods.class_prior import COUNTS_KEY, REPORTERS_KEY
from fedlt_app.methods.loss.fedlc import (
    FEDERATION_COUNTS_KEY,
    FedLCClient,
    FedLCServer,
    calibrated_logits,
    calibrated_loss,
)
from fedlt_app.models import EncoderClassifier


def test_calibrated_loss_matches_a_hand_computed_case() -> None:
    # 2 samples, 3 classes; client counts n = (16, 1, 81), tau = 2
    # margins tau * n^(-1/4) = 2 * (1/2, 1, 1/3) = (1, 2, 2/3)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, -1.0, 1.5]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    counts = torch.tensor([16, 1, 81])
    tau = 2.0
    # calibrated rows: (1, -1, -2/3) and (-0.5, -3, 5/6)
    rows = [(1.0, -1.0, -2 / 3), (-0.5, -3.0, 5 / 6)]
    picked = [rows[0][0], rows[1][2]]
    manual = sum(-(p - math.log(sum(math.exp(v) for v in row))) for p, row in zip(picked, rows, strict=True)) / 2
    torch.testing.assert_close(calibrated_logits(logits, counts, tau),
                               torch.tensor(rows, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(calibrated_loss(logits, targets, counts, tau)) == pytest.approx(manual, rel=1e-12)
    # the calibration changes the loss (a rarer class gets a larger margin)
    plain = float(F.cross_entropy(logits, targets))
    assert float(calibrated_loss(logits, targets, counts, tau)) != pytest.approx(plain)


def test_tau_zero_is_plain_cross_entropy_even_with_a_missing_class() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    targets = torch.tensor([0, 1, 2, 0, 1])
    for counts in (torch.tensor([3, 5, 7, 2]), torch.tensor([3, 5, 7, 0])):
        torch.testing.assert_close(calibrated_loss(logits, targets, counts, 0.0), F.cross_entropy(logits, targets))
        assert torch.equal(calibrated_logits(logits, counts, 0.0), logits)


def test_a_class_the_client_lacks_drops_out_of_the_softmax() -> None:
    # FedLTLib's count ** (-1/4) at count 0: an infinite margin, the class's calibrated logit is -inf
    logits = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    counts = torch.tensor([1, 1, 0])
    cal = calibrated_logits(logits, counts, 1.0)
    assert cal[0, 2] == -math.inf
    loss = calibrated_loss(logits, torch.tensor([0]), counts, 1.0)
    # = CE over the two present classes, with equal margins (1) that cancel
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(torch.tensor([[1.0, 2.0]]), torch.tensor([0]))))
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all() and grad[0, 2] == 0


def linear_model() -> EncoderClassifier:
    torch.manual_seed(0)
    return EncoderClassifier(nn.Flatten(), 4, 3)


def test_client_counts_its_own_labels_and_trains_on_the_calibrated_loss() -> None:
    cfg = resolve({"method": "fedlc", "fedlc-tau": 0.5})
    assert get_method("fedlc").server is FedLCServer
    client = get_method("fedlc").client(cfg, 3, {})
    assert isinstance(client, FedLCClient)
    model = linear_model()
    labels = torch.tensor([0, 0, 0, 1, 0, 1])  # class 2 absent on this client
    images = torch.zeros(len(labels), 1, 1, 4, dtype=torch.uint8)
    client.begin(model, images, labels, torch.Generator().manual_seed(0))
    assert client.class_counts.tolist() == [4, 2, 0]

    x = torch.rand(6, 1, 1, 4, generator=torch.Generator().manual_seed(1))
    z = model(x)
    loss = client.loss(model, x, labels)
    margins = torch.tensor([0.5 * 4 ** -0.25, 0.5 * 2 ** -0.25, math.inf])
    expected = F.cross_entropy(z - margins, labels)
    torch.testing.assert_close(loss, expected)
    assert torch.isfinite(loss)
    assert client.report() == {} and client.summands() == {}  # the paper's FedLC sends nothing beyond FedAvg


def test_federation_counts_calibrate_every_class_even_one_the_client_lacks() -> None:
    # FedLTLib: every client's margins are tau * (sum over clients of n_c)^(-1/4)
    cfg = resolve({"method": "fedlc", "fedlc-tau": 0.5, "fedlc-counts": "federation"})
    federation = np.array([16.0, 81.0, 1.0])
    client = FedLCClient(cfg, 3, {FEDERATION_COUNTS_KEY: federation})
    model = linear_model()
    labels = torch.tensor([0, 0, 0, 1, 0, 1])  # class 2 absent here, present in the federation
    client.begin(model, torch.zeros(len(labels), 1, 1, 4, dtype=torch.uint8), labels,
                 torch.Generator().manual_seed(0))
    x = torch.rand(6, 1, 1, 4, generator=torch.Generator().manual_seed(1))
    z = model(x)
    loss = client.loss(model, x, labels)
    torch.testing.assert_close(loss, F.cross_entropy(z - torch.tensor([0.25, 0.5 / 3, 0.5]), labels))
    # the absent class keeps a finite margin, so the client pushes its logit down on its own images (with its
    # own counts the class would leave the softmax and its classifier row get no gradient)
    (grad,) = torch.autograd.grad(loss, model.classifier.weight)
    assert grad[2].abs().sum() > 0
    own = get_method("fedlc").client(resolve({"method": "fedlc"}), 3, {})
    own.begin(model, torch.zeros(len(labels), 1, 1, 4, dtype=torch.uint8), labels, torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(own.loss(model, x, labels), model.classifier.weight)
    assert grad[2].abs().sum() == 0
    # it reports its own counts, and a 1 that lets a sum say how many clients reported
    report = client.report()
    assert report[COUNTS_KEY].tolist() == [4, 2, 0] and report[REPORTERS_KEY].tolist() == [1]
    assert client.summands()[COUNTS_KEY].dtype == np.int64
    with pytest.raises(RuntimeError, match="fedlc-counts=federation"):
        FedLCClient(cfg, 3, {}).begin(model, torch.zeros(2, 1, 1, 4, dtype=torch.uint8), torch.tensor([0, 1]),
                                      torch.Generator().manual_seed(0))


def _reports(*counts: list[int]) -> list[ClientReport]:
    return [ClientReport(p, sum(c), {COUNTS_KEY: np.array(c, dtype=np.int64), REPORTERS_KEY: np.array([1])})
            for p, c in enumerate(counts)]


def test_server_asks_round_one_for_counts_and_scales_the_running_total_to_the_federation() -> None:
    cfg = resolve({"method": "fedlc", "fedlc-counts": "federation"})
    server = FedLCServer(cfg, linear_model(), SimpleNamespace(num_clients=4))  # type: ignore[arg-type]
    assert server.wants_statistics_before_training(1) and server.broadcast(1, linear_model()) == {}
    # round 1's cohort (2 of the 4 clients) answers before training: the mean report times 4 clients
    server.absorb_statistics(1, linear_model(), _reports([6, 2, 0], [0, 2, 1]))
    assert not server.wants_statistics_before_training(1)
    np.testing.assert_allclose(server.broadcast(1, linear_model())[FEDERATION_COUNTS_KEY], [12.0, 8.0, 2.0])
    # training replies add to the total; under secure aggregation only their sum and how many they were
    server.absorb(1, _reports([6, 2, 0], [0, 2, 1]))
    server.absorb_sums(2, {COUNTS_KEY: np.array([2, 0, 3]), REPORTERS_KEY: np.array([2])})
    np.testing.assert_allclose(server.broadcast(3, linear_model())[FEDERATION_COUNTS_KEY],
                               np.array([14, 8, 5]) * 4 / 6)
    segments = server.sum_segments()
    assert segments[COUNTS_KEY].shape == (3,) and segments[REPORTERS_KEY].shape == (1,)
    assert all(spec.exact for spec in segments.values()) and server.statistics_sum_segments() == segments
    restored = FedLCServer(cfg, linear_model(), SimpleNamespace(num_clients=4))  # type: ignore[arg-type]
    restored.load_state_dict(server.state_dict())
    assert not restored.wants_statistics_before_training(4)  # a resumed run asks no second time
    np.testing.assert_array_equal(restored.broadcast(4, linear_model())[FEDERATION_COUNTS_KEY],
                                  server.broadcast(4, linear_model())[FEDERATION_COUNTS_KEY])


def test_client_counts_server_is_plain_fedavg() -> None:
    server = FedLCServer(resolve({"method": "fedlc"}), linear_model(), None)  # type: ignore[arg-type]
    assert not server.wants_statistics_before_training(1)
    server.absorb(1, [ClientReport(0, 3, {})])
    assert server.broadcast(2, linear_model()) == {} and server.sum_segments() == {} and server.state_dict() == {}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_federation_counts_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = {}
    for counts in ("client", "federation"):
        out = tmp_path / counts
        code = run_in_process(tmp_path, monkeypatch, f"method='fedlc' fedlc-counts='{counts}' num-server-rounds=2 "
                              f"samples-per-class=60 imbalance-ratio=10.0 output-dir='{out}' run-name='lc'",
                              num_clients=2)
        assert code == 0
        runs[counts] = _rows(out / "lc")
    federation, client = runs["federation"], runs["client"]
    assert [r["round"] for r in federation] == [1, 2] and all(r["accuracy"] > 0 for r in federation)
    # from round 1 on, each of the 2 clients gets the 10 federation counts beside the model; round 1's counts
    # query, before training, sends the model once more (the statistics query carries it)
    assert federation[1]["parameters_down"] - client[1]["parameters_down"] == 2 * 10
    assert federation[0]["parameters_down"] - 2 * client[0]["parameters_down"] == 2 * 10
    # and only round 1 has the query's answers: more bytes up than round 2
    assert federation[0]["bytes_up"] > federation[1]["bytes_up"]
    assert client[0]["bytes_up"] == client[1]["bytes_up"]


def test_federation_counts_under_secure_aggregation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = secure_rows(tmp_path, monkeypatch, "method='fedlc' fedlc-counts='federation'", num_clients=3)
    assert all(r["failed_clients"] == [] and r["accuracy"] > 0 for r in rows)


def test_inference_is_not_calibrated() -> None:
    cfg = resolve({"method": "fedlc", "fedlc-tau": 1.0})
    client = get_method("fedlc").client(cfg, 3, {})
    model = linear_model()
    x = torch.rand(4, 1, 1, 4, generator=torch.Generator().manual_seed(2))
    before = model(x).detach().clone()
    client.begin(model, torch.zeros(3, 1, 1, 4, dtype=torch.uint8), torch.tensor([0, 1, 1]),
                 torch.Generator().manual_seed(0))
    # the hook computes counts only: the network, and so what the server evaluates, is unchanged
    torch.testing.assert_close(model(x), before)
    torch.testing.assert_close(get_method("fedlc").server.evaluation_model(None, model)(x), before)  # type: ignore[arg-type]


def test_tau_default_and_check() -> None:
    assert "fedlc" in METHODS
    assert resolve({"method": "fedlc"}).fedlc_tau == 1.0
    with pytest.raises(ConfigError, match="fedlc-tau"):
        resolve({"method": "fedlc", "fedlc-tau": -0.1})
    assert resolve({"method": "fedlc"}).fedlc_counts == "client"
    with pytest.raises(ConfigError, match="fedlc-counts"):
        resolve({"method": "fedlc", "fedlc-counts": "global"})
