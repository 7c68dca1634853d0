"""swa-start: the server evaluates the running mean of the networks of rounds swa-start..r, training untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from app_runs import without_timing
from in_process import run_in_process
from torch import nn

from fedlt_app.checkpoint import load_final_model
from fedlt_app.config import ConfigError, resolve
from fedlt_app.swa import WeightAverage


def _network(weight: float, steps: int) -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for tensor in (net[0].weight, net[0].bias, net[1].weight, net[1].bias, net[1].running_mean):
            tensor.fill_(weight)
        net[1].running_var.fill_(2 * weight)
        net[1].num_batches_tracked.fill_(steps)
    return net


def test_the_mean_is_of_every_float_tensor_and_integer_buffers_keep_the_latest() -> None:
    average = WeightAverage(start_round=3)
    assert not average.active(2) and average.active(3) and average.active(9)
    networks = [_network(w, s) for w, s in ((1.0, 10), (2.0, 20), (6.0, 30))]
    for net in networks:
        averaged = average.update(net)
    state = averaged.state_dict()
    assert torch.equal(state["0.weight"], torch.full((2, 2), 3.0))  # (1 + 2 + 6) / 3
    assert torch.equal(state["1.running_mean"], torch.full((2,), 3.0))
    assert torch.equal(state["1.running_var"], torch.full((2,), 6.0))
    assert int(state["1.num_batches_tracked"]) == 30
    assert torch.equal(networks[-1][0].weight, torch.full((2, 2), 6.0))  # the evaluated network is untouched
    assert averaged is not networks[-1] and average.round_metrics() == {"swa_models": 3}
    assert WeightAverage(0).round_metrics() == {} and not WeightAverage(0).active(1)


def test_a_restored_average_continues_the_same_mean() -> None:
    straight, first = WeightAverage(1), WeightAverage(1)
    for w in (1.0, 4.0):
        straight.update(_network(w, 1))
        first.update(_network(w, 1))
    resumed = WeightAverage(1)
    resumed.load_state_dict(first.state_dict(), torch.device("cpu"))
    expected = straight.update(_network(10.0, 2)).state_dict()
    got = resumed.update(_network(10.0, 2)).state_dict()
    assert resumed.count == 3 and all(torch.equal(got[k], expected[k]) for k in expected)
    assert torch.equal(got["0.bias"], torch.full((2,), 5.0))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"swa-start": 11, "num-server-rounds": 10}, "swa-start: round 11 is past num-server-rounds=10"),
    ({"swa-start": -1}, "swa-start: must be >= 0"),
    ({"swa-start": 2, "al-method": "random"}, "swa-start: .*active learning"),
])
def test_bad_values_name_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(overrides)


SMALL = "method='fedavg-la' samples-per-class=20 imbalance-ratio=5.0 wandb-mode='disabled' checkpoint-every=1"


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_server_evaluates_and_saves_the_mean_and_trains_on_as_without_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folded: list[dict[str, torch.Tensor]] = []  # the state of every network folded into the mean, when folded
    update = WeightAverage.update

    def spy(self: WeightAverage, network: nn.Module) -> nn.Module:
        folded.append({k: v.detach().clone() for k, v in network.state_dict().items()})
        return update(self, network)

    monkeypatch.setattr(WeightAverage, "update", spy)
    for name, swa in (("plain", 0), ("swa", 2)):
        run_in_process(tmp_path, monkeypatch, f"{SMALL} num-server-rounds=3 swa-start={swa} "
                       f"output-dir='{tmp_path}' run-name='{name}'", num_clients=2)
    plain, swa = _rows(tmp_path / "plain"), _rows(tmp_path / "swa")
    assert len(folded) == 2  # rounds 2 and 3, in the swa run only
    assert "unaveraged_accuracy" not in swa[0] and "swa_models" not in plain[0]
    assert [r["swa_models"] for r in swa] == [0, 1, 2]
    # training is untouched: the swa run's latest models are the plain run's, round for round
    assert swa[0]["accuracy"] == plain[0]["accuracy"]
    assert [r["unaveraged_accuracy"] for r in swa[1:]] == [r["accuracy"] for r in plain[1:]]
    assert swa[1]["accuracy"] == swa[1]["unaveraged_accuracy"]  # the mean of one network is that network
    assert swa[2]["train_loss"] == plain[2]["train_loss"]
    final = load_final_model(tmp_path / "swa")["state"]
    for key, value in final.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (folded[0][key] + folded[1][key]) / 2, rtol=0, atol=1e-7)
    assert not torch.equal(final["classifier.weight"], folded[1]["classifier.weight"])


def test_a_resumed_run_continues_the_mean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_in_process(tmp_path, monkeypatch, f"{SMALL} num-server-rounds=3 swa-start=1 output-dir='{tmp_path}' "
                   "run-name='straight'", num_clients=2)
    run_in_process(tmp_path, monkeypatch, f"{SMALL} num-server-rounds=2 swa-start=1 output-dir='{tmp_path}' "
                   "run-name='stopped'", num_clients=2)
    run_in_process(tmp_path, monkeypatch, f"{SMALL} num-server-rounds=3 swa-start=1 output-dir='{tmp_path}' "
                   f"run-name='stopped' resume-from='{tmp_path / 'stopped'}'", num_clients=2)
    assert without_timing(_rows(tmp_path / "stopped")) == without_timing(_rows(tmp_path / "straight"))
    resumed, straight = (load_final_model(tmp_path / name)["state"] for name in ("stopped", "straight"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
