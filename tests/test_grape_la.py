"""GRAPE-LA (fedlt's method): RedGrape plus logit adjustment by the class prior."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from in_process import run_in_process
from test_redgrape import NUM_CLASSES, config, prototype_payload, setup, tiny_data, tiny_model

from fedlt_app.methods import ClientReport
from fedlt_app.methods.decoupled.grape_la import COUNTS_KEY, PRIOR_KEY, GrapeLAClient, GrapeLAServer, adjusted_loss
from fedlt_app.methods.decoupled.redgrape import RedGrapeClient, two_head_logits
from fedlt_app.train import train_locally


def la_config(**overrides):  # type: ignore[no-untyped-def]
    return config(**{"method": "grape-la", **overrides})


def test_adjusted_loss_matches_a_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]])
    targets = torch.tensor([2, 0])
    prior = np.array([0.7, 0.2, 0.1])
    tau = 0.5
    shifted = logits.numpy() + tau * np.log(prior)
    by_hand = np.mean([np.log(np.exp(row).sum()) - row[t] for row, t in zip(shifted, targets.numpy(), strict=True)])
    adjustment = torch.tensor(tau * np.log(prior), dtype=torch.float32)
    assert float(adjusted_loss(logits, targets, adjustment)) == pytest.approx(by_hand, rel=1e-6)


def test_the_adjustment_favours_rare_classes_in_training_not_at_inference() -> None:
    """A frequent class's logit is raised in the loss, so its gradient pushes it down less."""
    logits = torch.zeros(1, 2, requires_grad=True)
    adjustment = torch.log(torch.tensor([0.9, 0.1]))
    adjusted_loss(logits, torch.tensor([1]), adjustment).backward()
    # d/dz_rare = softmax(z + log π)_rare − 1 = 0.1 − 1: the rare target is pulled up far more than under CE (−0.5)
    torch.testing.assert_close(logits.grad, torch.tensor([[0.9, -0.9]]))


def test_tau_zero_is_redgrape_exactly() -> None:
    images, labels = tiny_data([20, 9, 4, 1])
    payload = {**prototype_payload(), PRIOR_KEY: np.array([0.4, 0.3, 0.2, 0.1])}
    states = []
    for method in (GrapeLAClient(la_config(**{"grape-la-tau": 0.0}), NUM_CLASSES, payload),
                   RedGrapeClient(config(), NUM_CLASSES, payload)):
        model = tiny_model()
        train_locally(model, images, labels, method, setup(epochs=2, batch_size=8), torch.Generator().manual_seed(4))
        states.append(model.state_dict())
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=0, msg=name)


def first_step_loss(cfg, payload, counts):  # type: ignore[no-untyped-def]
    images, labels = tiny_data(counts)
    model = tiny_model()
    method = GrapeLAClient(cfg, NUM_CLASSES, payload)
    method.begin(model, images, labels, torch.Generator().manual_seed(0))
    x, y = images[:6].float() / 255, labels[:6]
    return method, model, x, y


@pytest.mark.parametrize("mode", ["global", "local"])
def test_the_loss_uses_the_prior_the_key_names(mode: str) -> None:
    counts = [12, 6, 3, 0]
    global_prior = np.array([0.1, 0.2, 0.3, 0.4])
    payload = {**prototype_payload(), PRIOR_KEY: global_prior}
    method, model, x, y = first_step_loss(la_config(**{"grape-la-prior": mode, "grape-la-tau": 0.7}), payload, counts)
    prior = global_prior if mode == "global" else np.array(counts) / sum(counts)
    with np.errstate(divide="ignore"):
        adjustment = torch.tensor(0.7 * np.log(prior), dtype=torch.float32)
    want = adjusted_loss(two_head_logits(model, x), y, adjustment)
    torch.testing.assert_close(method.loss(model, x, y), want)


def test_round_one_falls_back_to_the_clients_own_counts() -> None:
    counts = [12, 6, 3, 1]
    method, model, x, y = first_step_loss(la_config(), {}, counts)  # no prior broadcast yet
    adjustment = torch.tensor(np.log(np.array(counts) / sum(counts)), dtype=torch.float32)
    torch.testing.assert_close(method.loss(model, x, y), adjusted_loss(two_head_logits(model, x), y, adjustment))


def test_local_prior_never_pushes_down_a_class_the_client_lacks() -> None:
    method, model, x, y = first_step_loss(la_config(**{"grape-la-prior": "local"}), {}, [12, 6, 3, 0])
    model.zero_grad()
    loss = method.loss(model, x, y)
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    assert torch.all(model.classifier.weight.grad[3] == 0) and model.classifier.bias.grad[3] == 0
    assert torch.any(model.classifier.weight.grad[0] != 0)


def test_client_reports_its_class_counts_beside_the_prototypes() -> None:
    images, labels = tiny_data([5, 0, 2, 7])
    method = GrapeLAClient(la_config(), NUM_CLASSES, {})
    train_locally(tiny_model(), images, labels, method, setup(), torch.Generator().manual_seed(1))
    report = method.report()
    np.testing.assert_array_equal(report[COUNTS_KEY], [5, 0, 2, 7])
    np.testing.assert_array_equal(report["proto-classes"], [0, 2, 3])


def reports(*count_rows: list[int]) -> list[ClientReport]:
    out = []
    for i, counts in enumerate(count_rows):
        classes = np.flatnonzero(counts)
        out.append(ClientReport(i, int(sum(counts)), {
            COUNTS_KEY: np.array(counts, dtype=np.int64),
            "proto-classes": classes,
            "proto-weight": np.ones((len(classes), NUM_CLASSES, 5), dtype=np.float32),
            "proto-bias": np.ones((len(classes), NUM_CLASSES), dtype=np.float32),
        }))
    return out


def test_server_broadcasts_the_normalised_sum_of_every_rounds_counts(tmp_path: Path) -> None:
    cfg = la_config()
    server = GrapeLAServer(cfg, tiny_model(), None)  # type: ignore[arg-type]
    assert PRIOR_KEY not in server.broadcast(1, tiny_model())
    server.absorb(1, reports([6, 2, 0, 0], [0, 2, 1, 1]))
    np.testing.assert_allclose(server.broadcast(2, tiny_model())[PRIOR_KEY], np.array([6, 4, 1, 1]) / 12)
    server.absorb(2, reports([0, 0, 0, 4]))  # a sampled cohort: the running total, not the last round's
    np.testing.assert_allclose(server.broadcast(3, tiny_model())[PRIOR_KEY], np.array([6, 4, 1, 5]) / 16)
    restored = GrapeLAServer(cfg, tiny_model(), None)  # type: ignore[arg-type]
    restored.load_state_dict(server.state_dict())
    np.testing.assert_array_equal(restored.prior.count_total, server.prior.count_total)
    np.testing.assert_array_equal(restored.known, server.known)


def test_local_mode_broadcasts_no_prior() -> None:
    server = GrapeLAServer(la_config(**{"grape-la-prior": "local"}), tiny_model(), None)  # type: ignore[arg-type]
    server.absorb(1, reports([6, 2, 0, 0]))
    assert PRIOR_KEY not in server.broadcast(2, tiny_model())


def test_grape_la_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    code = run_in_process(tmp_path, monkeypatch,
                          f"method='grape-la' num-server-rounds=2 samples-per-class=60 imbalance-ratio=10.0 "
                          f"output-dir='{out}' run-name='gla'", num_clients=2)
    assert code == 0
    rows = [json.loads(line) for line in (out / "gla" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[1]["classes_with_prototype"] == 10
    # round 2 carries the prototypes (W: 10 x 10 x 128, b: 10 x 10) and the 10-class prior down to each of the
    # two clients, beside the model (parameters_down counts floats: the boolean prototype mask is not one)
    assert rows[1]["parameters_down"] - rows[0]["parameters_down"] == 2 * (10 * 10 * 128 + 10 * 10 + 10)
