"""Fed-GraB: the PID controllers, the balanced gradient on a hand-built step, the DPA split, the state.

Expected values come from an independent re-statement of the official
``PID`` / ``PIDLOSS`` rules in plain Python and numpy (scalar loops, closed-form
gradients), never from the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from in_process import run_in_process
from torch import nn

from fedlt_app.config import resolve
from fedlt_app.methods.base import ClientReport
from fedlt_app.methods.loss.fedgrab import (
    BALANCED,
    STATE_KEYS,
    FedGraBClient,
    FedGraBServer,
    balance_weight,
    dpa_prior,
    draw_exemptions,
    exemption_probabilities,
    pid_step,
    shot_split,
)
from fedlt_app.models import EncoderClassifier

C, D = 3, 4
GAINS = (10.0, 0.01, 0.1)  # the official PID's Kp, Ki, Kd


def phi(x: float) -> float:
    return (10 / 9) / ((1 / 9) + math.exp(-0.5 * x))


class ReferencePID:
    """The official PID in PID_DELTA mode, one scalar controller (LimitMax is a no-op there)."""

    def __init__(self, out: float = 0.0, errors: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        self.out, self.error = out, list(errors)

    def calc(self, current: float) -> float:
        kp, ki, kd = GAINS
        self.error[2], self.error[1] = self.error[1], self.error[0]
        self.error[0] = 0.0 - current
        e = self.error
        self.out += kp * (e[0] - e[1]) + ki * e[0] + kd * (e[0] - 2.0 * e[1] + e[2])
        return self.out


def fedgrab_cfg(**extra: object):  # type: ignore[no-untyped-def]
    return resolve({"method": "fedgrab", **extra})


# ---------------------------------------------------------------- the controller


def test_weight_map_is_one_at_zero_and_bounded_by_zero_and_ten() -> None:
    x = torch.tensor([0.0, 2.0, -2.0, 60.0, -60.0], dtype=torch.float64)
    got = balance_weight(x).numpy()
    np.testing.assert_allclose(got[:3], [phi(0.0), phi(2.0), phi(-2.0)], rtol=1e-12)
    assert got[0] == pytest.approx(1.0) and got[3] == pytest.approx(10.0) and got[4] < 1e-12


def test_pid_steps_match_the_official_incremental_controller() -> None:
    rng = np.random.default_rng(0)
    refs = [ReferencePID(), ReferencePID(0.3, (0.2, -0.1, 0.05)), ReferencePID()]
    out = torch.tensor([0.0, 0.3, 0.0], dtype=torch.float64)
    errors = torch.tensor([[0.0] * 3, [0.2, -0.1, 0.05], [0.0] * 3], dtype=torch.float64)
    active = torch.tensor([True, True, False])
    for _ in range(6):
        measured = rng.normal(size=3)
        out, errors = pid_step(out, errors, torch.from_numpy(measured), GAINS, active)
        expected = [refs[c].calc(measured[c]) for c in range(2)]
        np.testing.assert_allclose(out[:2].numpy(), expected, rtol=1e-12)
    assert out[2] == 0.0 and torch.equal(errors[2], torch.zeros(3, dtype=torch.float64))  # inactive: untouched


def test_exemption_probabilities_and_draws_follow_the_codes_rule() -> None:
    np.testing.assert_allclose(exemption_probabilities(4), [1.0, 0.1 ** (1 / 3), 0.1 ** (2 / 3), 0.1])
    assert exemption_probabilities(1) == [1.0]  # the official 0/0 (ZeroDivisionError); FedLTLib's value
    g = torch.Generator().manual_seed(0)
    balanced = torch.ones(4, dtype=torch.bool)
    draws = torch.stack([draw_exemptions(balanced, g) for _ in range(4000)]).double()
    assert bool(draws[:, 0].all())  # the first balanced class is always exempt
    assert float(draws[:, 1].mean()) == pytest.approx(0.1 ** (1 / 3), abs=0.03)
    # class 2 is the 2nd exemption after class 1 was exempt, the 1st... never: class 0 always takes k = 0
    exempt_1 = draws[:, 1] == 1
    assert float(draws[exempt_1, 2].mean()) == pytest.approx(0.1 ** (2 / 3), abs=0.04)
    assert float(draws[~exempt_1, 2].mean()) == pytest.approx(0.1 ** (1 / 3), abs=0.04)
    closed = torch.tensor([False, True, False, True])
    assert not bool(torch.stack([draw_exemptions(closed, g) for _ in range(50)])[:, [0, 2]].any())


# ---------------------------------------------------------------- one balanced step, by hand


def linear_model(seed: int = 0) -> EncoderClassifier:
    torch.manual_seed(seed)
    return EncoderClassifier(nn.Flatten(), D, C)


def test_one_step_reweights_the_logit_gradient_and_accumulates_it() -> None:
    # class 0: controller closed (DPA: not tail); class 1: balanced, always exempt (first); class 2: balanced
    pos, neg = np.array([0.5, 0.2, 0.1]), np.array([0.3, 0.9, 2.0])
    out, errors = np.array([0.7, 0.4, 1.5]), np.array([[0.1, 0.0, 0.0], [0.6, 0.5, 0.4], [1.2, 1.0, 0.9]])
    state = dict(zip(STATE_KEYS, (pos, neg, out, errors), strict=True))
    client = FedGraBClient(fedgrab_cfg(), C, {BALANCED: np.array([0.0, 1.0, 1.0], np.float32)}, state=state)
    model = linear_model(3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(5, 1, 1, D, generator=g), torch.tensor([0, 2, 1, 2, 0])
    seed = 7
    u = float(torch.rand(1, generator=torch.Generator().manual_seed(seed)))  # the one draw, for class 2
    assert u >= 0.1  # this seed leaves class 2 balanced
    client.begin(model, (x * 255).to(torch.uint8), y, torch.Generator().manual_seed(seed))

    # the reference: closed controller reset, one PID step for classes 1 and 2, weights, exemption
    refs = [None, ReferencePID(out[1], tuple(errors[1])), ReferencePID(out[2], tuple(errors[2]))]
    u_out = [0.0] + [refs[c].calc(pos[c] - neg[c]) for c in (1, 2)]
    pos_w, neg_w = np.array([phi(v) for v in u_out]), np.array([phi(-v) for v in u_out])
    w = np.array(model.classifier.weight.detach().double().numpy())
    b = model.classifier.bias.detach().double().numpy()
    h = x.reshape(5, D).double().numpy()
    z = h @ w.T + b
    t = np.eye(C)[y.numpy()]
    weight = pos_w * t + neg_w * (1 - t)
    weight[:, 1] = 1.0  # exempt
    sigma = 1 / (1 + np.exp(-z))
    dz = weight * (sigma - t) / 5
    expected_loss = np.sum(-(t * np.log(sigma) + (1 - t) * np.log(1 - sigma))) / 5  # unweighted, as the code

    loss = client.loss(model, x, y)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(expected_loss, rel=1e-6)
    np.testing.assert_allclose(model.classifier.weight.grad.double().numpy(), dz.T @ h, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.classifier.bias.grad.double().numpy(), dz.sum(0), rtol=1e-5, atol=1e-7)
    g_abs = np.abs(dz)
    g_abs[:, 1] = 0.0  # an exempt class adds nothing to the accumulators
    kept = client.state_to_keep(model)
    np.testing.assert_allclose(kept["fedgrab-pos-grad"], pos + (g_abs * t).sum(0), rtol=1e-6)
    np.testing.assert_allclose(kept["fedgrab-neg-grad"], neg + (g_abs * (1 - t)).sum(0), rtol=1e-6)
    np.testing.assert_allclose(kept["fedgrab-pid-out"], u_out, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(kept["fedgrab-pid-errors"][0], [0.0, 0.0, 0.0])  # closed: reset
    np.testing.assert_allclose(kept["fedgrab-pid-errors"][2], [neg[2] - pos[2], 1.2, 1.0], rtol=1e-12)
    report = client.report()["fedgrab-weights"]
    np.testing.assert_allclose(report, [pos_w[1:].mean(), neg_w[1:].mean()], rtol=1e-6)


def test_without_a_broadcast_every_class_is_balanced_from_a_fresh_state() -> None:
    client = FedGraBClient(fedgrab_cfg(), C, {})
    model = linear_model(0)
    x, y = torch.rand(4, 1, 1, D), torch.tensor([0, 1, 2, 0])
    client.begin(model, (x * 255).to(torch.uint8), y, torch.Generator().manual_seed(0))
    assert bool(client.balanced.all())
    client.loss(model, x, y).backward()  # first step: G± = 0, so every weight is φ(0) = 1
    np.testing.assert_allclose(client.report()["fedgrab-weights"], [1.0, 1.0])
    kept = client.state_to_keep(model)
    again = FedGraBClient(fedgrab_cfg(), C, {}, state=kept)  # the node's next round continues from here
    again.begin(model, (x * 255).to(torch.uint8), y, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(again.pos_grad.numpy(), kept["fedgrab-pos-grad"])
    np.testing.assert_array_equal(again.pid_errors.numpy(), kept["fedgrab-pid-errors"])


# ---------------------------------------------------------------- the DPA and the server


def test_shot_split_on_a_hand_worked_prior() -> None:
    prior = np.array([0.05, 0.3, 0.1, 0.4, 0.15])  # sorted: 3, 1, 4, 2, 0; cumulative 40, 70, 85, 95, 100
    assert shot_split(prior) == {"head": [3, 1, 4], "middle": [2], "tail": [0]}


def test_dpa_prior_is_the_normalised_classifier_row_norms() -> None:
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])
    np.testing.assert_allclose(dpa_prior(w), np.array([5.0, 1.0, 10.0]) / 16.0)


def dpa_server(**cfg: object) -> tuple[FedGraBServer, EncoderClassifier]:
    torch.manual_seed(0)
    model = EncoderClassifier(nn.Flatten(), 2, 5)
    with torch.no_grad():  # row norms 20, 15, 7.5, 5, 2.5: prior 0.4, 0.3, 0.15, 0.1, 0.05 -> tail = class 4
        model.classifier.weight.copy_(torch.tensor([[20.0, 0], [0, 15.0], [7.5, 0], [0, 5.0], [2.5, 0]]))
    return FedGraBServer(fedgrab_cfg(**cfg), model, None), model  # type: ignore[arg-type]


def test_server_broadcasts_the_dpa_tail_only_when_asked_and_after_round_one() -> None:
    server, model = dpa_server()
    assert server.broadcast(1, model) == {} and server.broadcast(2, model) == {}  # `all`: the official code
    assert server.round_metrics()["fedgrab_balanced_classes"] == 5
    assert server.round_metrics()["fedgrab_dpa_tail_classes"] == 1
    server, model = dpa_server(**{"fedgrab-balance-classes": "dpa-tail"})
    assert server.broadcast(1, model) == {}  # round 1: an untrained classifier says nothing
    np.testing.assert_array_equal(server.broadcast(2, model)[BALANCED], [0, 0, 0, 0, 1])
    assert server.round_metrics()["fedgrab_balanced_classes"] == 1


def test_server_state_round_trips_and_averages_the_reported_weights() -> None:
    server, model = dpa_server(**{"fedgrab-balance-classes": "dpa-tail"})
    reports = [ClientReport(k, 5, {"fedgrab-weights": np.array([wp, wn])}) for k, (wp, wn) in
               enumerate([(3.0, 0.5), (5.0, 0.1)])]
    server.absorb(1, reports)
    assert server.round_metrics()["fedgrab_pos_weight"] == pytest.approx(4.0)
    assert server.round_metrics()["fedgrab_neg_weight"] == pytest.approx(0.3)
    restored, _ = dpa_server(**{"fedgrab-balance-classes": "dpa-tail"})
    restored.load_state_dict(server.state_dict())  # stateless: the DPA reads the global model each round
    for server_round in (2, 3):
        np.testing.assert_array_equal(restored.broadcast(server_round, model)[BALANCED],
                                      server.broadcast(server_round, model)[BALANCED])


def test_bad_fedgrab_keys_fail_naming_the_key() -> None:
    with pytest.raises(ValueError, match="fedgrab-balance-classes"):
        fedgrab_cfg(**{"fedgrab-balance-classes": "head"})
    with pytest.raises(ValueError, match="fedgrab-kp"):
        fedgrab_cfg(**{"fedgrab-kp": -1.0})


# ---------------------------------------------------------------- through the real apps (in process)


def test_fedgrab_with_the_dpa_runs_two_rounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "out" / "fedgrab"
    code = run_in_process(tmp_path, monkeypatch, f"method='fedgrab' fedgrab-balance-classes='dpa-tail' "
                          f"samples-per-class=60 imbalance-ratio=10.0 num-server-rounds=2 "
                          f"output-dir='{tmp_path / 'out'}' run-name='fedgrab'", num_clients=2)
    assert code == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["fedgrab_balanced_classes"] == 10  # round 1: every class
    assert rows[1]["fedgrab_balanced_classes"] == rows[1]["fedgrab_dpa_tail_classes"] < 10
    assert all(0.0 < r["fedgrab_pos_weight"] <= 10.0 and 0.0 <= r["fedgrab_neg_weight"] <= 10.0 for r in rows)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
