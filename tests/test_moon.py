"""MOON: the model-contrastive term, the projection head and the per-client persistent state.

Expected values are computed here in numpy from the models' weights (never
read back from the code under test). The persistent state is checked at three
levels: the store on a Flower RecordDict, the ClientApp's train handler called
in process with one Context per node, and a run through the real apps (in process).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from in_process import run_in_process
from torch import nn
from torch.nn import functional as F

from fedlt_app import client_app
from fedlt_app.client_state import CLIENT_STATE_KEY, load_client_state, save_client_state
from fedlt_app.config import resolve
from fedlt_app.methods import get_method
from fedlt_app.methods.base import ClientMethod, ClientReport
from fedlt_app.methods.representation.moon import (
    PROJECTION_DIM,
    MoonClient,
    MoonServer,
    add_projection_head,
    model_contrastive_loss,
)
from fedlt_app.models import EncoderClassifier, build_model
from fedlt_app.task import federated_data, initial_model
from fedlt_app.train import LocalTraining, train_locally

C, D = 3, 4  # classes; pixels of a (1, 1, D) image = the toy backbone's feature width


def toy_moon_model(seed: int) -> EncoderClassifier:
    """Backbone h = the D pixels; MOON's head on top: z = L2(relu(L1 h)), logits = W z + b."""
    torch.manual_seed(seed)
    return add_projection_head(EncoderClassifier(nn.Sequential(nn.Flatten()), D, C))


def np_forward(model: EncoderClassifier, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(z, logits) of a toy MOON model, in float64 numpy from its weights."""
    w = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    h = x.numpy().reshape(len(x), -1).astype(np.float64)
    hidden = np.maximum(h @ w["encoder.projection.0.weight"].T + w["encoder.projection.0.bias"], 0.0)
    z = hidden @ w["encoder.projection.2.weight"].T + w["encoder.projection.2.bias"]
    return z, z @ w["classifier.weight"].T + w["classifier.bias"]


def np_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def np_contrastive(z: np.ndarray, z_glob: np.ndarray, z_prev: np.ndarray, tau: float) -> float:
    pos, neg = np.exp(np_cos(z, z_glob) / tau), np.exp(np_cos(z, z_prev) / tau)
    return float(np.mean(-np.log(pos / (pos + neg))))


def np_ce(logits: np.ndarray, y: np.ndarray) -> float:
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def moon_cfg(**extra: object):  # type: ignore[no-untyped-def]
    return resolve({"method": "moon", **extra})


# ---------------------------------------------------------------- the term


def test_contrastive_term_on_a_hand_worked_case() -> None:
    # row 1: z = z_glob, z ⟂ z_prev -> cos 1 and 0: −log(e^2 / (e^2 + 1)) at τ = 0.5
    # row 2: z = −z_glob, z = z_prev -> cos −1 and 1: −log(e^−2 / (e^−2 + e^2))
    z = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    z_glob = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    z_prev = torch.tensor([[0.0, 5.0], [0.0, 0.5]])
    row1 = np.log(1 + np.exp(-2.0))
    row2 = np.log(1 + np.exp(4.0))
    got = model_contrastive_loss(z, z_glob, z_prev, temperature=0.5)
    assert float(got) == pytest.approx((row1 + row2) / 2, rel=1e-6)


def test_contrastive_term_matches_numpy_on_random_rows() -> None:
    g = torch.Generator().manual_seed(0)
    z, z_glob, z_prev = (torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for tau in (0.1, 0.5, 2.0):
        expected = np_contrastive(z.numpy(), z_glob.numpy(), z_prev.numpy(), tau)
        assert float(model_contrastive_loss(z, z_glob, z_prev, tau)) == pytest.approx(expected, rel=1e-10)


def test_client_loss_is_ce_plus_mu_times_the_term_against_the_received_and_previous_models() -> None:
    received, previous = toy_moon_model(0), toy_moon_model(1)
    state = MoonClient(moon_cfg(), C, {}).state_to_keep(previous)
    client = MoonClient(moon_cfg(**{"moon-mu": 2.5, "moon-temperature": 0.3}), C, {}, state=state)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(6, 1, 1, D, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    z_received, z_previous = np_forward(received, x)[0], np_forward(previous, x)[0]
    local = received  # the client trains the model it received, in place
    client.begin(local, (x * 255).to(torch.uint8), y, g)
    with torch.no_grad():  # local training has moved the local model away from what it received
        for param in local.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=g))
    z_local, logits = np_forward(local, x)
    expected = np_ce(logits, y.numpy()) + 2.5 * np_contrastive(z_local, z_received, z_previous, 0.3)
    got = client.loss(local, x, y)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert all(p.grad is not None for p in local.parameters())
    assert client.global_model is not None and client.previous_model is not None
    assert all(p.grad is None for m in (client.global_model, client.previous_model) for p in m.parameters())
    assert not client.global_model.training and not client.previous_model.training
    report = client.report()
    assert report["moon-has-previous"][0] == 1.0
    assert report["moon-contrastive-loss"][0] == pytest.approx((expected - np_ce(logits, y.numpy())) / 2.5, rel=1e-5)


def test_without_a_previous_model_the_loss_is_plain_cross_entropy() -> None:
    """Round 1 of the official code: the pool is empty, the term is CE over one logit, i.e. 0."""
    model = toy_moon_model(0)
    client = MoonClient(moon_cfg(**{"moon-mu": 5.0}), C, {})
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 1, 1, D, generator=g), torch.tensor([0, 1, 2, 1, 0])
    client.begin(model, (x * 255).to(torch.uint8), y, g)
    assert client.previous_model is None and client.global_model is None
    assert float(client.loss(model, x, y)) == pytest.approx(np_ce(np_forward(model, x)[1], y.numpy()), rel=1e-6)
    assert client.report()["moon-has-previous"][0] == 0.0


def test_frozen_passes_draw_no_randomness_so_batches_and_dropout_stay_paired() -> None:
    """With a previous model, the extra eval-mode passes must not shift the loop's dropout masks."""

    def loss_entries(state: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(3)
        model = get_method("moon").extend_model(build_model("cnn", 10, 1, 28))
        client = MoonClient(moon_cfg(), 10, {}, state=state)
        inputs, rng_states = [], []
        original = client.loss

        def spy(model, x, y):  # type: ignore[no-untyped-def]
            inputs.append(x.clone())
            rng_states.append(torch.get_rng_state())
            return original(model, x, y)

        client.loss = spy  # type: ignore[method-assign]
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (40, 1, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(10).repeat(4)
        setup = LocalTraining(epochs=2, batch_size=16, lr=0.05, momentum=0.9, grad_clip=1.0, prox_mu=0.0,
                              dataset="fmnist")
        torch.manual_seed(11)
        train_locally(model, images, labels, client, setup, torch.Generator().manual_seed(11))
        assert (client.previous_model is not None) == bool(state)
        return inputs, rng_states

    torch.manual_seed(7)
    previous = get_method("moon").extend_model(build_model("cnn", 10, 1, 28))
    with_term = loss_entries(MoonClient(moon_cfg(), 10, {}).state_to_keep(previous))
    without = loss_entries({})
    assert len(with_term[0]) == len(without[0]) == 6
    for got, want in zip(with_term, without, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# ---------------------------------------------------------------- the model


def test_projection_head_follows_modelfedcon_and_keeps_the_backbone() -> None:
    torch.manual_seed(5)
    plain = build_model("cnn", 10, 1, 28)
    torch.manual_seed(5)
    moon = add_projection_head(build_model("cnn", 10, 1, 28))
    state, plain_state = moon.state_dict(), plain.state_dict()
    for key, value in plain_state.items():  # same names, same initial values: runs stay paired
        if not key.startswith("classifier."):
            assert torch.equal(state[key], value), key
    assert moon.feature_dim == PROJECTION_DIM == 256
    assert tuple(moon.classifier.weight.shape) == (10, 256)
    proj = moon.encoder.projection
    assert [type(m) for m in proj] == [nn.Linear, nn.ReLU, nn.Linear]
    assert tuple(proj[0].weight.shape) == (128, 128) and tuple(proj[2].weight.shape) == (256, 128)
    moon.eval()
    plain.load_state_dict({k: v for k, v in state.items() if k in plain_state and not k.startswith("classifier.")},
                          strict=False)
    plain.eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():  # logits = l3(l2(relu(l1(h)))) with h the backbone's features
        h = plain.encoder(x)
        expected = moon.classifier(proj[2](F.relu(proj[0](h))))
        assert torch.allclose(moon(x), expected, atol=1e-6)


# ---------------------------------------------------------------- the persistent store


def test_the_store_round_trips_replaces_and_drops() -> None:
    node_a, node_b = RecordDict(), RecordDict()
    assert load_client_state(node_a) == {}
    save_client_state(node_a, {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array([4], np.int64)})
    save_client_state(node_b, {"w": np.ones(2, np.float32)})
    loaded = load_client_state(node_a)
    np.testing.assert_array_equal(loaded["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert loaded["n"].dtype == np.int64 and loaded["n"][0] == 4
    np.testing.assert_array_equal(load_client_state(node_b)["w"], np.ones(2, np.float32))  # per node
    save_client_state(node_a, {"w": np.zeros(1, np.float32)})  # replaces, no merging
    assert set(load_client_state(node_a)) == {"w"}
    save_client_state(node_a, {})
    assert CLIENT_STATE_KEY not in node_a and load_client_state(node_a) == {}


def test_a_method_that_keeps_nothing_stores_nothing_and_keeps_what_it_was_given() -> None:
    plain = ClientMethod(resolve({"method": "fedavg"}), C, {})
    assert plain.state == {} and plain.state_to_keep(toy_moon_model(0)) == {}
    given = {"x": np.ones(2, np.float32)}
    assert get_method("fedavg").client(resolve({"method": "fedavg"}), C, {}, state=given).state_to_keep(
        toy_moon_model(0)) == given


# ------------------------------------------ the ClientApp's train handler, in process

RUN_CONFIG = {"method": "moon", "samples-per-class": 20, "imbalance-ratio": 2.0, "device": "cpu",
              "precision": "fp32", "local-epochs": 1}


def _train_message(node_id: int, server_round: int, arrays: dict[str, torch.Tensor]) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m-{node_id}-{server_round}", src_node_id=0, dst_node_id=node_id,
                        reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=3600.0,
                        message_type="train")
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"server-round": server_round})})
    return Message(content=content, metadata=metadata)


def _context(node_id: int, partition_id: int) -> Context:
    return Context(run_id=1, node_id=node_id, node_config={"partition-id": partition_id, "num-partitions": 3},
                   state=RecordDict(), run_config=dict(RUN_CONFIG))


def test_round_two_contrasts_against_the_nodes_own_round_one_model(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = resolve(RUN_CONFIG)
    start = initial_model(cfg, federated_data(cfg, 3)).state_dict()
    seen: dict[int, dict[str, torch.Tensor] | None] = {}  # node id -> the previous model its last round used
    previous_models: list[dict[str, torch.Tensor] | None] = []
    original_begin = MoonClient.begin

    def spying_begin(self, model, images, labels, generator):  # type: ignore[no-untyped-def]
        original_begin(self, model, images, labels, generator)
        previous_models.append(None if self.previous_model is None else
                               {k: v.clone() for k, v in self.previous_model.state_dict().items()})

    monkeypatch.setattr(MoonClient, "begin", spying_begin)

    def train(context: Context, server_round: int, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        reply = client_app.train(_train_message(context.node_id, server_round, arrays), context)
        seen[context.node_id] = previous_models.pop()
        assert reply.content["method"]["moon-has-previous"].numpy()[0] == float(seen[context.node_id] is not None)
        return reply.content["arrays"].to_torch_state_dict()

    node_a, node_b, node_c = _context(11, 0), _context(12, 1), _context(13, 2)
    round1 = {node.node_id: train(node, 1, start) for node in (node_a, node_b)}
    assert seen[11] is None and seen[12] is None  # round 1: no previous model, no term
    for node in (node_a, node_b):  # each node stored its own trained model, nothing else
        stored = load_client_state(node.state)
        assert {k.removeprefix("previous-model/") for k in stored} == set(start)
        for key, value in round1[node.node_id].items():
            np.testing.assert_array_equal(stored[f"previous-model/{key}"], value.numpy())
    assert not torch.equal(round1[11]["classifier.weight"], round1[12]["classifier.weight"])

    global_round2 = {k: (round1[11][k] + round1[12][k]) / 2 if v.is_floating_point() else v
                     for k, v in round1[11].items()}
    round2_a = train(node_a, 2, global_round2)
    assert seen[11] is not None
    for key, value in round1[11].items():  # the negative is node A's own round-1 local model
        assert torch.equal(seen[11][key], value), key
    stored = load_client_state(node_a.state)  # and now its round-2 model
    np.testing.assert_array_equal(stored["previous-model/classifier.weight"], round2_a["classifier.weight"].numpy())
    train(node_c, 2, global_round2)  # a node that never trained has no previous model (no shared store)
    assert seen[13] is None


def test_server_counts_clients_with_a_previous_model() -> None:
    model = toy_moon_model(0)
    server = MoonServer(moon_cfg(), model, None)  # type: ignore[arg-type]
    assert server.round_metrics() == {"moon_clients_with_previous": 0, "moon_contrastive_loss": 0.0}

    def report(partition_id: int, had_previous: bool, term: float) -> ClientReport:
        return ClientReport(partition_id, 5, {"moon-has-previous": np.array([had_previous], np.float32),
                                              "moon-contrastive-loss": np.array([term], np.float32)})

    server.absorb(2, [report(0, True, 0.4), report(1, False, 0.0), report(2, True, 0.8)])
    metrics = server.round_metrics()
    assert metrics["moon_clients_with_previous"] == 2
    assert metrics["moon_contrastive_loss"] == pytest.approx(0.6, rel=1e-6)


def test_bad_moon_keys_fail_naming_the_key() -> None:
    with pytest.raises(ValueError, match="moon-temperature"):
        resolve({"method": "moon", "moon-temperature": 0.0})
    with pytest.raises(ValueError, match="moon-mu"):
        resolve({"method": "moon", "moon-mu": -1.0})


# ---------------------------------------------------------------- through the real apps (in process)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# what a round computed, without the wall-clock fields
_COMPUTED = ("accuracy", "tail_accuracy", "loss", "train_loss", "per_class_accuracy", "moon_clients_with_previous",
             "moon_contrastive_loss")


def test_moon_killed_mid_way_resumes_to_the_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clients' previous models survive a kill: each node continues from the file it wrote after the
    checkpointed round, not from a later round the killed run had already trained (persist-client-state)."""
    from fedlt_app import server_app

    common = f"method='moon' samples-per-class=60 imbalance-ratio=10.0 checkpoint-every=2 output-dir='{tmp_path}'"
    run_in_process(tmp_path, monkeypatch, f"{common} num-server-rounds=4 run-name='whole'", num_clients=2)
    whole = _rows(tmp_path / "whole")
    assert [r["moon_clients_with_previous"] for r in whole] == [0, 2, 2, 2]  # from round 2 both kept theirs

    evaluate, evaluated = server_app.evaluate, []

    def dies_in_round_3(*args, **kwargs):  # the server is killed after round 3's clients trained
        evaluated.append(1)
        if len(evaluated) == 3:
            raise KeyboardInterrupt("killed")
        return evaluate(*args, **kwargs)

    killed = tmp_path / "killed"
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(server_app, "evaluate", dies_in_round_3)
        run_in_process(tmp_path, monkeypatch, f"{common} num-server-rounds=4 run-name='killed'", num_clients=2)
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["round"] == 2
    assert sorted(p.name for p in (killed / "client-state" / "partition-0").iterdir()) == [
        "round-2.npz", "round-3.npz"]  # round 3's state is newer than the checkpoint: a resume must not read it

    run_in_process(tmp_path, monkeypatch, f"{common} num-server-rounds=4 resume-from='{killed}'", num_clients=2)
    resumed = _rows(killed)
    assert [r["round"] for r in resumed] == [1, 2, 3, 4]
    for row, reference in zip(resumed, whole, strict=True):
        assert {k: row[k] for k in _COMPUTED} == {k: reference[k] for k in _COMPUTED}, row["round"]
    assert json.loads((killed / "summary.json").read_text())["status"] == "completed"
    # round 3's stale file was overwritten when round 3 trained again; round 2's stays for the checkpoint that
    # was on disk while round 4 trained, round 4's is the last checkpoint's
    assert sorted(p.name for p in (killed / "client-state" / "partition-1").iterdir()) == [
        "round-2.npz", "round-4.npz"]


def test_moon_without_persisted_state_resumes_with_new_client_states(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    common = ("method='moon' samples-per-class=60 imbalance-ratio=10.0 checkpoint-every=1 "
              "persist-client-state=false")
    run_dir = tmp_path / "out" / "moon"
    run_in_process(tmp_path, monkeypatch, f"{common} num-server-rounds=2 output-dir='{tmp_path / 'out'}' "
                   "run-name='moon'", num_clients=2)
    rows = _rows(run_dir)
    # round 1: no client has a previous model; round 2: both kept theirs on their node (context.state)
    assert [r["moon_clients_with_previous"] for r in rows] == [0, 2]
    assert rows[0]["moon_contrastive_loss"] == 0.0 and 0.0 < rows[1]["moon_contrastive_loss"] < 10.0
    assert not (run_dir / "client-state").exists()

    run_in_process(tmp_path, monkeypatch, f"{common} num-server-rounds=3 resume-from='{run_dir}'", num_clients=2)
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[2]["moon_clients_with_previous"] == 0  # memory only: a new Flower run starts new client states
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
