"""FedAvg-LA (fedlt's ablation of GRAPE-LA): one head, CE(z + τ·log π, y) with the federation's summed prior."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from in_process import run_in_process
from test_secagg_e2e import secure_rows
from torch import nn

from fedlt_app.config import resolve
from fedlt_app.methods import ClientMethod, ClientReport
from fedlt_app.methods.class_prior import COUNTS_KEY, PRIOR_KEY, REPORTERS_KEY, FederationCounts, counts_report
from fedlt_app.methods.loss.fedavg_la import FedAvgLAClient, FedAvgLAServer
from fedlt_app.models import EncoderClassifier
from fedlt_app.train import LocalTraining, train_locally

NUM_CLASSES = 4


def tiny_model(seed: int = 0) -> EncoderClassifier:
    torch.manual_seed(seed)
    return EncoderClassifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU()), 5, NUM_CLASSES)


def tiny_data(counts: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    return torch.randint(0, 256, (len(labels), 1, 2, 2), generator=g, dtype=torch.uint8), labels


def config(**overrides):  # type: ignore[no-untyped-def]
    return resolve({"method": "fedavg-la", "grad-clip": 0.0, **overrides})


def setup() -> LocalTraining:
    return LocalTraining(epochs=2, batch_size=8, lr=0.1, momentum=0.9, grad_clip=0.0, prox_mu=0.0, dataset="fmnist")


def begun(cfg, payload, counts):  # type: ignore[no-untyped-def]
    images, labels = tiny_data(counts)
    model, method = tiny_model(), FedAvgLAClient(cfg, NUM_CLASSES, payload)
    method.begin(model, images, labels, torch.Generator().manual_seed(0))
    return method, model, images[:6].float() / 255, labels[:6]


def by_hand(logits: torch.Tensor, targets: torch.Tensor, prior: np.ndarray, tau: float) -> float:
    """Mean over rows of logsumexp(z + τ log π) − (z + τ log π)_y, in float64 numpy."""
    with np.errstate(divide="ignore"):
        shifted = logits.detach().double().numpy() + tau * np.log(prior)
    losses = []
    for row, t in zip(shifted, targets.numpy(), strict=True):
        finite = row[np.isfinite(row)]
        losses.append(np.log(np.exp(finite).sum()) - row[t])
    return float(np.mean(losses))


def test_the_loss_is_the_logit_adjusted_cross_entropy_by_the_global_prior() -> None:
    prior = np.array([0.1, 0.2, 0.3, 0.4])
    method, model, x, y = begun(config(**{"fedavg-la-tau": 0.7}), {PRIOR_KEY: prior}, [12, 6, 3, 1])
    assert float(method.loss(model, x, y).detach()) == pytest.approx(by_hand(model(x), y, prior, 0.7), rel=1e-6)


def test_local_prior_and_round_one_use_the_clients_own_counts() -> None:
    counts = [12, 6, 3, 0]
    own = np.array(counts) / sum(counts)
    for cfg, payload in ((config(), {}),  # round 1: nothing broadcast yet
                         (config(**{"fedavg-la-prior": "local"}), {PRIOR_KEY: np.full(4, 0.25)})):
        method, model, x, y = begun(cfg, payload, counts)
        loss = method.loss(model, x, y)
        assert float(loss) == pytest.approx(by_hand(model(x), y, own, 1.0), rel=1e-6)
        model.zero_grad()
        loss.backward()  # the class the client lacks left its softmax: no push on its logit
        assert torch.all(model.classifier.weight.grad[3] == 0) and math.isfinite(float(loss))


def test_tau_zero_is_fedavg_exactly() -> None:
    images, labels = tiny_data([20, 9, 4, 1])
    states = []
    for method in (FedAvgLAClient(config(**{"fedavg-la-tau": 0.0}), NUM_CLASSES, {PRIOR_KEY: np.full(4, 0.25)}),
                   ClientMethod(config(), NUM_CLASSES, {})):
        model = tiny_model()
        train_locally(model, images, labels, method, setup(), torch.Generator().manual_seed(4))
        states.append(model.state_dict())
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=0, msg=name)


def test_the_adjustment_changes_training() -> None:
    images, labels = tiny_data([20, 9, 4, 1])
    trained = []
    for tau in (0.0, 1.0):
        model = tiny_model()
        prior = {PRIOR_KEY: np.array([0.5, 0.3, 0.15, 0.05])}
        method = FedAvgLAClient(config(**{"fedavg-la-tau": tau}), NUM_CLASSES, prior)
        train_locally(model, images, labels, method, setup(), torch.Generator().manual_seed(4))
        trained.append(model.classifier.bias.detach().clone())
    # the adjusted loss stops pushing the rare classes' biases down as hard as plain CE does
    assert trained[1][3] > trained[0][3]
    np.testing.assert_array_equal(method.report()[COUNTS_KEY], [20, 9, 4, 1])
    np.testing.assert_array_equal(method.summands()[COUNTS_KEY], [20, 9, 4, 1])


def reports(*count_rows: list[int]) -> list[ClientReport]:
    return [ClientReport(i, sum(c), {COUNTS_KEY: np.array(c, dtype=np.int64)}) for i, c in enumerate(count_rows)]


def test_server_broadcasts_the_running_total_and_sums_match_reports() -> None:
    server = FedAvgLAServer(config(), tiny_model(), None)  # type: ignore[arg-type]
    assert server.broadcast(1, tiny_model()) == {}
    server.absorb(1, reports([6, 2, 0, 0], [0, 2, 1, 1]))
    np.testing.assert_allclose(server.broadcast(2, tiny_model())[PRIOR_KEY], np.array([6, 4, 1, 1]) / 12)
    server.absorb_sums(2, {COUNTS_KEY: np.array([0, 0, 0, 4])})  # the secure path: the cohort's sum alone
    np.testing.assert_allclose(server.broadcast(3, tiny_model())[PRIOR_KEY], np.array([6, 4, 1, 5]) / 16)
    assert server.sum_segments()[COUNTS_KEY].shape == (NUM_CLASSES,) and server.sum_segments()[COUNTS_KEY].exact
    restored = FedAvgLAServer(config(), tiny_model(), None)  # type: ignore[arg-type]
    restored.load_state_dict(server.state_dict())
    np.testing.assert_array_equal(restored.broadcast(3, tiny_model())[PRIOR_KEY],
                                  server.broadcast(3, tiny_model())[PRIOR_KEY])
    local = FedAvgLAServer(config(**{"fedavg-la-prior": "local"}), tiny_model(), None)  # type: ignore[arg-type]
    local.absorb(1, reports([6, 2, 0, 0]))
    assert local.broadcast(2, tiny_model()) == {}


def test_one_running_total_gives_the_prior_and_the_federation_counts() -> None:
    """``FederationCounts`` serves the prior (normalised) and FedLC's counts (scaled by reports to clients)."""
    plain = [counts_report(torch.tensor(c), count_reporters=True) for c in ([6, 2, 0, 0], [0, 2, 1, 1])]
    assert plain[0][REPORTERS_KEY].tolist() == [1] and REPORTERS_KEY not in counts_report(torch.tensor([1, 0, 0, 0]))
    tally = FederationCounts(NUM_CLASSES, num_clients=5, count_reporters=True)
    assert tally.prior_payload() == {} and tally.federation_counts() is None
    tally.add_reports(plain)
    tally.add_sums({COUNTS_KEY: np.array([0, 0, 0, 4]), REPORTERS_KEY: np.array([1])})  # the secure path's sums
    np.testing.assert_allclose(tally.prior_payload()[PRIOR_KEY], np.array([6, 4, 1, 5]) / 16)
    np.testing.assert_allclose(tally.federation_counts(), np.array([6, 4, 1, 5]) * 5 / 3)
    assert set(tally.sum_segments()) == {COUNTS_KEY, REPORTERS_KEY}
    prior_only = FederationCounts(NUM_CLASSES)
    assert set(prior_only.sum_segments()) == {COUNTS_KEY}
    prior_only.add_reports(plain)  # the plain path keeps no tally either, as the secure path could not
    assert prior_only.clients_counted == 0
    with pytest.raises(ValueError, match="count_reporters"):
        prior_only.federation_counts()
    prior_only.load_state_dict({"count_total": np.array([1, 2, 3, 4])})  # a checkpoint written before the tally
    np.testing.assert_allclose(prior_only.prior_payload()[PRIOR_KEY], np.array([1, 2, 3, 4]) / 10)
    assert prior_only.clients_counted == 0


def test_fedavg_la_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    code = run_in_process(tmp_path, monkeypatch, f"method='fedavg-la' num-server-rounds=2 samples-per-class=60 "
                          f"imbalance-ratio=10.0 output-dir='{out}' run-name='fla'", num_clients=2)
    assert code == 0
    rows = [json.loads(line) for line in (out / "fla" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    # beside the model, round 2 sends each of the two clients the 10-class prior (floats: parameters count them);
    # up go 10 integer counts per client every round (bytes, not parameters)
    assert rows[1]["parameters_down"] - rows[0]["parameters_down"] == 2 * 10
    assert rows[0]["parameters_up"] == rows[0]["parameters_down"] and rows[0]["bytes_up"] > rows[0]["bytes_down"]


def test_fedavg_la_under_secure_aggregation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = secure_rows(tmp_path, monkeypatch, "method='fedavg-la'", num_clients=3)
    assert all(r["failed_clients"] == [] and r["accuracy"] > 0 for r in rows)
    assert rows[1]["parameters_down"] > rows[0]["parameters_down"]  # the summed prior goes down in round 2
