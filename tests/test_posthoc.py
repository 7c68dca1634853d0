"""The post-hoc adjustment whose strength the clients pick on their own training images (fedavg-la-posthoc,
FLAT-LA's flat-la-posthoc): the rule on hand-built cases, the client's and server's parts, and runs through
Flower's engine, plainly and under secure aggregation."""

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

from fedlt_app.config import ConfigError, resolve
from fedlt_app.configured_data import federated_data
from fedlt_app.data.transforms import to_float
from fedlt_app.methods import get_method
from fedlt_app.methods.base import ClientReport
from fedlt_app.methods.class_prior import PRIOR_KEY
from fedlt_app.methods.loss.fedavg_la import FedAvgLAClient, FedAvgLAServer
from fedlt_app.methods.posthoc import (
    HITS_KEY,
    TOTALS_KEY,
    balanced_recalls,
    candidate_strengths,
    hits_per_strength,
    pick_strength,
    posthoc_shift,
    shifted_network,
)
from fedlt_app.models import EncoderClassifier
from fedlt_app.precision import precision_for
from fedlt_app.task import trained_model

PRIOR = np.array([0.9, 0.09, 0.01])


def test_the_shift_is_minus_strength_times_log_prior_and_leaves_an_absent_class_alone() -> None:
    assert torch.allclose(posthoc_shift(PRIOR, 0.5), torch.tensor(-0.5 * np.log(PRIOR), dtype=torch.float32))
    assert torch.equal(posthoc_shift(PRIOR, 0.0), torch.zeros(3))
    shift = posthoc_shift(np.array([3.0, 1.0, 0.0]), 1.0)  # counts: normalised; class 2 absent
    assert torch.allclose(shift, torch.tensor([-math.log(0.75), -math.log(0.25), 0.0]))


def test_hits_count_each_class_right_answers_per_strength() -> None:
    # two samples of class 0 (logit lead 1 and 3 over class 2), one of class 2 (behind class 0 by 2)
    logits = torch.tensor([[1.0, -9.0, 0.0], [3.0, -9.0, 0.0], [2.0, -9.0, 0.0]])
    labels = torch.tensor([0, 0, 2])
    # log(0.9 / 0.01) = 4.50: strength s moves class 2 up by 4.50 s against class 0
    hits = hits_per_strength(logits, labels, PRIOR, (0.0, 0.5, 1.0), 3)
    assert hits.dtype == np.int64 and hits.tolist() == [[2, 0, 0], [1, 0, 1], [0, 0, 1]]
    totals = np.array([2, 0, 1])  # class 1 has no sample: it does not count in the balanced recall
    assert balanced_recalls(hits, totals).tolist() == [0.5, 0.75, 0.5]
    assert pick_strength((0.0, 0.5, 1.0), hits, totals) == 0.5


def test_a_tie_goes_to_the_least_change() -> None:
    totals = np.array([1, 1])
    level = np.array([[1, 0], [1, 1], [1, 1], [1, 1]])  # strengths -0.5, 0, 0.25, 0.5 below
    assert pick_strength((-0.5, 0.0, 0.25, 0.5), level, totals) == 0.0
    assert pick_strength((-0.5, 0.25, 0.5), np.array([[1, 1], [1, 1], [1, 0]]), totals) == 0.25
    assert pick_strength((-0.25, 0.25), np.array([[1, 1], [1, 1]]), totals) == 0.25
    with pytest.raises(ValueError, match="no class has a sample"):
        balanced_recalls(level, np.array([0, 0]))


def linear_model() -> EncoderClassifier:
    torch.manual_seed(0)
    return EncoderClassifier(nn.Flatten(), 4, 3)


def test_the_shifted_network_is_a_copy_whose_logits_move_by_the_shift() -> None:
    network = linear_model()
    x = torch.randn(5, 4)
    before = network(x)
    shifted = shifted_network(network, PRIOR, 0.75)
    assert torch.allclose(shifted(x), before - 0.75 * torch.log(torch.tensor(PRIOR, dtype=torch.float32)), atol=1e-6)
    assert torch.equal(network(x), before)  # the network given (the running mean's copy) is untouched
    with pytest.raises(ValueError, match="linear head with a bias"):
        shifted_network(EncoderClassifier(nn.Flatten(), 4, 3, classifier=nn.Linear(4, 3, bias=False)), PRIOR, 1.0)


def test_candidate_strengths_always_hold_zero() -> None:
    assert candidate_strengths("0.5,-0.25") == (-0.25, 0.0, 0.5)
    assert candidate_strengths("-1,-0.75,-0.5,-0.25,0,0.25,0.5,0.75,1")[4] == 0.0


def test_flat_la_sets_it_from_its_own_key_and_bad_values_name_the_key() -> None:
    assert resolve({"method": "flat-la"}).fedavg_la_posthoc == "none"
    cfg = resolve({"method": "flat-la", "flat-la-posthoc": "training-recall"})
    assert cfg.fedavg_la_posthoc == "training-recall" and resolve(cfg.as_dict()) == cfg
    assert resolve({"method": "fedavg-la", "fedavg-la-posthoc": "training-recall"}).fedavg_la_posthoc == (
        "training-recall")
    for overrides, message in [
        ({"method": "flat-la", "fedavg-la-posthoc": "training-recall"},
         "fedavg-la-posthoc: method 'flat-la' sets it .* from flat-la-posthoc"),
        ({"method": "fedavg", "fedavg-la-posthoc": "training-recall"},
         "fedavg-la-posthoc: only methods 'fedavg-la' and 'flat-la'"),
        ({"method": "flat-la", "flat-la-posthoc": "test-set"}, "flat-la-posthoc: must be one of none, training"),
        ({"method": "fedavg-la", "fedavg-la-posthoc-grid": "0,0.5,0.5"}, "fedavg-la-posthoc-grid: must be distinct"),
        ({"method": "fedavg-la", "fedavg-la-posthoc-grid": "0,a"}, "fedavg-la-posthoc-grid: must be distinct"),
    ]:
        with pytest.raises(ConfigError, match=message):
            resolve(overrides)


def posthoc_config() -> object:
    return resolve({"method": "fedavg-la", "fedavg-la-posthoc": "training-recall",
                    "fedavg-la-posthoc-grid": "0,0.5,1", "dataset": "fmnist"})


def test_the_client_answers_its_counts_under_the_prior_the_query_carried() -> None:
    cfg = posthoc_config()
    model = EncoderClassifier(nn.Flatten(), 28 * 28, 3)
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0] * 8 + [1] * 3 + [2])
    client = FedAvgLAClient(cfg, 3, {PRIOR_KEY: PRIOR})
    precision = precision_for("fp32", torch.device("cpu"))
    answer = client.statistics(model, images, labels, precision)
    with torch.no_grad():
        logits = model(to_float(images, "fmnist"))
    assert answer[HITS_KEY].tolist() == hits_per_strength(logits, labels, PRIOR, (0.0, 0.5, 1.0), 3).tolist()
    assert answer[TOTALS_KEY].tolist() == [8, 3, 1]
    summands = client.statistics_summands(model, images, labels, precision)
    assert all(np.array_equal(summands[k], answer[k]) for k in answer)
    with pytest.raises(RuntimeError, match="carried no class prior"):
        FedAvgLAClient(cfg, 3, {}).statistics(model, images, labels, precision)


def test_the_server_asks_on_the_network_it_evaluates_and_shifts_a_copy_by_the_pick() -> None:
    cfg = posthoc_config()
    network = linear_model()
    server = FedAvgLAServer(cfg, network, None)  # the data are not read
    server.absorb(1, [ClientReport(0, 10, {"class-counts": np.array([90, 9, 1])})])
    asked = []

    def ask_clients(on: EncoderClassifier) -> None:
        asked.append(on)
        # two clients; strength 0.5 gets every class right, 0 misses the rare class, 1 misses the frequent one
        reports = [ClientReport(0, 0, {HITS_KEY: np.array([[80, 8, 0], [80, 8, 1], [0, 8, 1]]),
                                       TOTALS_KEY: np.array([80, 8, 1])}),
                   ClientReport(1, 0, {HITS_KEY: np.array([[10, 1, 0], [10, 1, 0], [5, 1, 0]]),
                                       TOTALS_KEY: np.array([10, 1, 0])})]
        server.absorb_statistics(1, on, reports)

    adjusted = server.adjusted_evaluation_model(1, network, ask_clients)
    assert asked == [network] and server.posthoc_strength == 0.5 and adjusted is not network
    assert server.round_metrics() == {"posthoc_strength": 0.5}
    assert server.statistics_payload(1)[PRIOR_KEY].tolist() == pytest.approx([0.9, 0.09, 0.01])
    x = torch.randn(3, 4)
    assert torch.allclose(adjusted(x), network(x) - 0.5 * torch.log(torch.tensor(PRIOR, dtype=torch.float32)),
                          atol=1e-6)
    off = get_method("fedavg-la").server(resolve({"method": "fedavg-la"}), network, None)
    assert off.adjusted_evaluation_model(1, network, ask_clients) is network and len(asked) == 1
    assert off.statistics_payload(1) == {} and off.round_metrics() == {}


SMALL = ("samples-per-class=60 imbalance-ratio=10.0 precision='fp32' num-server-rounds=3 local-epochs=3 "
         "fedavg-la-posthoc-grid='-1,0,1,2'")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_flat_la_with_the_posthoc_adjustment_through_flower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: the adjustment changes only what is evaluated (training, the averaged model and the
    unadjusted accuracy are FLAT-LA's own, round for round); each round's accuracy is that of the network
    the clients' counts picked, and the final model is that network."""
    for name, keys in {"plain": "", "posthoc": "flat-la-posthoc='training-recall'"}.items():
        run_in_process(tmp_path, monkeypatch, f"method='flat-la' flat-la-tau=0 flat-la-average-from=0.5 {keys} {SMALL} "
                       f"output-dir='{tmp_path}' run-name='{name}'", num_clients=2)
    plain, posthoc = _rows(tmp_path / "plain"), _rows(tmp_path / "posthoc")
    assert [r["train_loss"] for r in posthoc] == [r["train_loss"] for r in plain]
    assert [r["unadjusted_accuracy"] for r in posthoc] == [r["accuracy"] for r in plain]
    assert [r["unaveraged_accuracy"] for r in posthoc[1:]] == [r["unaveraged_accuracy"] for r in plain[1:]]
    assert all(r["posthoc_strength"] in (-1.0, 0.0, 1.0, 2.0) for r in posthoc)
    assert "posthoc_strength" not in plain[0] and "unadjusted_accuracy" not in plain[0]
    assert any(r["posthoc_strength"] != 0.0 for r in posthoc), "cross-entropy on long-tailed data wants a shift"
    for p, q in zip(posthoc, plain, strict=True):  # strength 0 evaluates the network unchanged
        if p["posthoc_strength"] == 0.0:
            assert p["accuracy"] == q["accuracy"]
    # the final model is the adjusted network: it classifies the test set as the last round measured
    model, cfg = trained_model(tmp_path / "posthoc")
    images, labels = federated_data(cfg, 2).test_data()
    with torch.no_grad():
        accuracy = float((model(to_float(images, cfg.dataset)).argmax(dim=1) == labels).float().mean())
    assert accuracy == pytest.approx(posthoc[-1]["accuracy"], abs=1e-6)


def test_the_posthoc_adjustment_under_secure_aggregation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counts travel as one masked sum of integers (exact): the run completes with a pick every round."""
    rows = secure_rows(tmp_path, monkeypatch, "method='flat-la' flat-la-posthoc='training-recall' "
                       "flat-la-average-from=0.5 fedavg-la-posthoc-grid='-0.5,0,0.5,1'", num_clients=3)
    assert all(r["failed_clients"] == [] and r["posthoc_strength"] in (-0.5, 0.0, 0.5, 1.0) for r in rows)
    assert all(0 <= r["unadjusted_accuracy"] <= 1 for r in rows)
