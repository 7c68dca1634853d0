"""FedLoGe: the static sparse ETF (SSE-C), the three heads' training, GHA and LA realignment, personalised accuracy.

Expected values are computed here, in numpy or with torch's autograd and Adam
as the official ``gen_sparse_ETF`` does, from the models' weights or from
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
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from in_process import run_in_process, run_off_and_secagg
from torch import nn

from fedlt_app import client_app
from fedlt_app.client_state import CLIENT_STATE_KEY, load_client_state
from fedlt_app.config import ConfigError, resolve
from fedlt_app.methods import get_method
from fedlt_app.methods.fixed_classifier.fedloge import (
    LOCAL_BIAS,
    LOCAL_WEIGHT,
    REALIGN,
    SSE_TAG,
    FedLoGeClient,
    FedLoGeHeads,
    FedLoGeServer,
    RealignedHead,
    add_fedloge_heads,
    sparse_etf,
    sse_objective,
    sse_weight,
)
from fedlt_app.models import EncoderClassifier, build_model
from fedlt_app.records import content_parameters
from fedlt_app.task import federated_data, initial_model
from fedlt_app.train import LocalTraining, train_locally

C, P, D = 4, 6, 5  # classes; pixels of a (1, 1, P) image; the toy backbone's feature width
STEPS = 300  # SSE-C optimisation steps in the unit tests (the default 10000 is the official)


def fedloge_cfg(**extra: object):  # type: ignore[no-untyped-def]
    return resolve({"method": "fedloge", "device": "cpu", "precision": "fp32", "fedloge-sse-steps": STEPS,
                    **extra})


def toy_model(seed: int) -> EncoderClassifier:
    """Backbone h = A x + a (D features of the P pixels); FedLoGe's heads on top."""
    torch.manual_seed(seed)
    return add_fedloge_heads(EncoderClassifier(nn.Sequential(nn.Flatten(), nn.Linear(P, D)), D, C))


def numpy_state(model: EncoderClassifier) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def column_cosines(m: np.ndarray) -> np.ndarray:
    units = m / np.linalg.norm(m, axis=0)
    cosines = units.T @ units
    np.fill_diagonal(cosines, np.nan)
    return cosines


# ---------------------------------------------------------------- SSE-C


def test_unpruned_unoptimised_sse_is_a_simplex_etf() -> None:
    m = sparse_etf(16, 5, 0.0, 0, 0.1, seed=3)
    np.testing.assert_allclose(np.linalg.norm(m, axis=0), 1.0, atol=1e-6)
    np.testing.assert_allclose(column_cosines(m)[~np.eye(5, dtype=bool)], -1 / 4, atol=1e-6)


@pytest.mark.parametrize(("dim", "classes", "sparsity"), [(32, 10, 0.6), (20, 4, 0.3), (128, 10, 0.6)])
def test_pruning_zeroes_exactly_the_floor_of_beta_d_c_entries_of_the_etf(dim: int, classes: int,
                                                                           sparsity: float) -> None:
    full = sparse_etf(dim, classes, 0.0, 0, 0.1, seed=7)
    pruned = sparse_etf(dim, classes, sparsity, 0, 0.1, seed=7)
    zero = pruned == 0
    assert zero.sum() == int(sparsity * dim * classes)
    np.testing.assert_array_equal(pruned[~zero], full[~zero])  # the survivors are the ETF's own entries


def official_sparse_etf(start: np.ndarray, steps: int, target_norm: float) -> np.ndarray:
    """``gen_sparse_ETF``'s optimisation, written as the official code does it: autograd, torch's Adam(lr 1e-4)."""
    sparse = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    mask = (sparse != 0).double()
    optimizer = torch.optim.Adam([sparse], lr=0.0001)
    for _ in range(steps):
        optimizer.zero_grad()
        norms = torch.norm(sparse, p=2, dim=0)
        norm_loss = torch.sum((norms - target_norm) ** 2)
        cos_sim = torch.mm((sparse / norms).t(), sparse / norms)
        torch.diagonal(cos_sim).fill_(-1)
        angle_loss = -torch.acos(cos_sim.max(dim=1)[0].clamp(-0.99999, 0.99999)).mean()
        (norm_loss + angle_loss).backward()
        sparse.grad *= mask
        optimizer.step()
    return sparse.detach().numpy()


def test_sse_optimisation_is_the_official_adam_on_the_official_loss() -> None:
    start = sparse_etf(24, 6, 0.6, 0, 0.1, seed=11)
    expected = official_sparse_etf(start, 200, 0.1)
    np.testing.assert_allclose(sparse_etf(24, 6, 0.6, 200, 0.1, seed=11), expected, rtol=1e-9, atol=1e-12)


def test_sse_gradient_equals_autograds() -> None:
    w = np.random.default_rng(0).normal(size=(9, 5)) * 0.2
    w[np.random.default_rng(1).random(w.shape) < 0.5] = 0.0
    t = torch.tensor(w, requires_grad=True)
    norms = t.norm(dim=0)
    cosines = (t / norms).T @ (t / norms)
    torch.diagonal(cosines).fill_(-1)
    loss = ((norms - 0.3) ** 2).sum() - torch.acos(cosines.max(dim=1)[0].clamp(-0.99999, 0.99999)).mean()
    loss.backward()
    value, grad = sse_objective(w, 0.3)
    assert value == pytest.approx(float(loss.detach()), rel=1e-12)
    np.testing.assert_allclose(grad, t.grad.numpy(), atol=1e-12)


def test_optimised_sse_keeps_its_zeros_reaches_the_norm_and_spreads_the_classes() -> None:
    start = sparse_etf(64, 10, 0.6, 0, 0.1, seed=5)
    end = sparse_etf(64, 10, 0.6, 10000, 0.1, seed=5)  # the official number of steps
    np.testing.assert_array_equal(end == 0, start == 0)
    np.testing.assert_allclose(np.linalg.norm(end, axis=0), 0.1, rtol=0.02)  # from ~0.63 (40% of a unit column)
    assert np.nanmax(column_cosines(end)) < np.nanmax(column_cosines(start))  # nearest neighbours farther apart
    assert np.nanmax(column_cosines(end)) < 0.0  # every pair of classes beyond 90°


def test_every_node_builds_the_same_sse_from_the_config_and_it_never_travels() -> None:
    cfg = fedloge_cfg()
    first = sse_weight(cfg, D, C)
    rebuilt = torch.from_numpy(sparse_etf(D, C, cfg.fedloge_sparsity, STEPS, cfg.fedloge_sse_norm,
                                          int(np.random.SeedSequence([cfg.seed, SSE_TAG]).generate_state(1)[0]))
                               .T.copy()).float()
    assert torch.equal(first, rebuilt)
    assert not torch.equal(first, sse_weight(fedloge_cfg(seed=1), D, C))  # the run seed draws it
    assert first.shape == (C, D)
    model = toy_model(0)
    FedLoGeServer(cfg, model, None)  # type: ignore[arg-type]
    assert torch.equal(model.classifier.sse, first)
    assert set(model.travelling_state()) == {"encoder.1.weight", "encoder.1.bias", "classifier.aux.weight",
                                             "classifier.aux.bias"}  # neither the SSE-C nor the local head


def test_aux_head_starts_as_fedavgs_classifier_and_the_model_travels_as_many_numbers_as_fedavgs() -> None:
    torch.manual_seed(4)
    fedavg = build_model("cnn", 10, 1, 28)
    torch.manual_seed(4)
    fedloge = get_method("fedloge").extend_model(build_model("cnn", 10, 1, 28))
    travelling = fedloge.travelling_state()
    assert torch.equal(travelling["classifier.aux.weight"], fedavg.state_dict()["classifier.weight"])
    assert sum(v.numel() for v in travelling.values()) == sum(v.numel() for v in fedavg.state_dict().values())
    with pytest.raises(KeyError, match="travelling state"):
        fedloge.load_travelling_state({**travelling, "classifier.local.weight": torch.zeros(10, 128)})


# ---------------------------------------------------------------- local training


def test_one_step_trains_the_backbone_through_the_sse_and_the_heads_on_detached_features() -> None:
    cfg = fedloge_cfg(**{"local-lr": 0.3, "momentum": 0.0, "grad-clip": 0.0, "batch-size": 8, "local-epochs": 1})
    model = toy_model(0)
    images = torch.randint(0, 256, (8, 1, 1, P), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1])  # class 3 absent
    client = FedLoGeClient(cfg, C, {}, state={LOCAL_WEIGHT: np.full((C, D), 0.1, np.float32),
                                              LOCAL_BIAS: np.arange(C, dtype=np.float32)})
    # the state the loop starts from, once begin has put the SSE-C and the local head in place
    begun = toy_model(0)
    FedLoGeClient(cfg, C, {}, state=client.state).begin(begun, images, labels, torch.Generator())
    w = numpy_state(begun)
    sse = begun.classifier.sse.double().numpy()
    np.testing.assert_array_equal(w["classifier.local.weight"], 0.1 * np.ones((C, D), np.float32))

    x = images.double().numpy().reshape(8, P) / 255.0
    y = np.eye(C)[labels.numpy()]
    h = x @ w["encoder.1.weight"].T + w["encoder.1.bias"]
    g_sse = (np_softmax(h @ sse.T) - y) / 8  # dCE/dlogits
    g_h = g_sse @ sse  # only the SSE-C's loss reaches the backbone
    g_aux = (np_softmax(h @ w["classifier.aux.weight"].T + w["classifier.aux.bias"]) - y) / 8
    g_local = (np_softmax(h @ w["classifier.local.weight"].T + w["classifier.local.bias"]) - y) / 8
    expected = {
        "encoder.1.weight": w["encoder.1.weight"] - 0.3 * g_h.T @ x,
        "encoder.1.bias": w["encoder.1.bias"] - 0.3 * g_h.sum(0),
        "classifier.aux.weight": w["classifier.aux.weight"] - 0.3 * g_aux.T @ h,
        "classifier.aux.bias": w["classifier.aux.bias"] - 0.3 * g_aux.sum(0),
        "classifier.local.weight": w["classifier.local.weight"] - 0.3 * g_local.T @ h,
        "classifier.local.bias": w["classifier.local.bias"] - 0.3 * g_local.sum(0),
    }
    stats = train_locally(model, images, labels, client, LocalTraining.from_config(cfg), torch.Generator())
    assert stats.steps == 1
    after = numpy_state(model)
    for key, value in expected.items():
        np.testing.assert_allclose(after[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert torch.equal(model.classifier.sse, begun.classifier.sse)  # never trained
    kept = client.state_to_keep(model)  # the trained local head stays on the node
    np.testing.assert_allclose(kept[LOCAL_WEIGHT], expected["classifier.local.weight"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kept[LOCAL_BIAS], expected["classifier.local.bias"], rtol=1e-5, atol=1e-6)


def test_a_clients_first_local_head_is_linears_initialisation_from_its_method_stream() -> None:
    cfg = fedloge_cfg()
    heads = []
    for _ in range(2):
        model = toy_model(0)
        FedLoGeClient(cfg, C, {}).begin(model, torch.zeros(4, 1, 1, P, dtype=torch.uint8), torch.arange(4),
                                        torch.Generator().manual_seed(9))
        heads.append(model.classifier.local.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    assert heads[0].abs().max() <= D ** -0.5 and heads[0].std() > 0.1 * D ** -0.5


# ---------------------------------------------------------------- realignment


def hand_built_heads(model: EncoderClassifier) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    aux_w = np.array([[3.0, 4.0, 0, 0, 0], [0, 0.5, 0, 0, 0], [1.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0]])
    aux_b = np.array([0.1, -0.2, 0.3, 0.0])
    local_w = np.array([[0, 0, 0, 0, 2.0], [0, 0, 0, 1.0, 0], [0, 0, 0, 0, 0.5], [0, 3.0, 4.0, 0, 0]])
    local_b = np.array([0.0, 1.0, 0.0, -1.0])
    with torch.no_grad():
        model.classifier.aux.weight.copy_(torch.from_numpy(aux_w))
        model.classifier.aux.bias.copy_(torch.from_numpy(aux_b))
        model.classifier.local.weight.copy_(torch.from_numpy(local_w))
        model.classifier.local.bias.copy_(torch.from_numpy(local_b))
    return aux_w, aux_b, local_w, local_b


def features(model: EncoderClassifier, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.encoder(x).double().numpy()


def test_gha_rescales_every_row_of_the_aux_head_to_the_configured_norm() -> None:
    cfg = fedloge_cfg(**{"fedloge-gha-norm": 1.7})
    model = toy_model(0)
    server = FedLoGeServer(cfg, model, None)  # type: ignore[arg-type]
    aux_w, aux_b, _, _ = hand_built_heads(model)
    realigned = np.array([[1.02, 1.36, 0, 0, 0], [0, 1.7, 0, 0, 0], [1.7, 0, 0, 0, 0], [0, 0, 1.7, 0, 0]])
    server.broadcast(1, model)
    evaluated = server.evaluation_model(model)
    x = torch.rand(7, 1, 1, P, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = evaluated(x).double().numpy()
    np.testing.assert_allclose(got, features(model, x) @ realigned.T + aux_b, rtol=1e-5, atol=1e-6)
    assert server.round_metrics()["fedloge_aux_norm_ratio"] == pytest.approx(5.0 / 0.5)
    assert torch.equal(model.classifier.aux.weight.double(), torch.from_numpy(aux_w))  # the global model untouched


@pytest.mark.parametrize("realign", [True, False])
def test_personal_model_is_the_received_backbone_with_local_plus_aux_heads_and_absent_classes_masked(
        realign: bool) -> None:
    model = toy_model(0)
    aux_w, aux_b, local_w, local_b = hand_built_heads(model)
    cfg = fedloge_cfg(**{"local-lr": 0.5})
    state = {LOCAL_WEIGHT: local_w.astype(np.float32), LOCAL_BIAS: local_b.astype(np.float32)}
    client = FedLoGeClient(cfg, C, {REALIGN: np.ones(1, np.int8)} if realign else {}, state=state)
    received = toy_model(0)
    received.load_state_dict(model.state_dict())
    images = torch.randint(0, 256, (16, 1, 1, P), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 3] * 5 + [0])  # class 2 absent
    train_locally(model, images, labels, client, LocalTraining.from_config(cfg), torch.Generator().manual_seed(0))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    personal = client.personalised_model(model)
    assert personal is not model
    x = torch.rand(6, 1, 1, P, generator=torch.Generator().manual_seed(1))
    h = features(received, x)  # the backbone the client received, not the one it trained
    scale = np.linalg.norm(local_w, axis=1, keepdims=True) if realign else 1.0
    expected = h @ local_w.T + local_b + h @ (scale * aux_w).T + aux_b
    with torch.no_grad():
        got = personal(x).double().numpy()
    assert np.all(np.isneginf(got[:, 2]))
    held = [0, 1, 3]
    np.testing.assert_allclose(got[:, held], expected[:, held], rtol=1e-5, atol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key


# ---------------------------------------------------------------- server and config


@pytest.mark.parametrize(("when", "rounds"), [("every-round", [1, 2, 3]), ("last-round", [3]), ("off", [])])
def test_server_realigns_in_the_configured_rounds_and_evaluates_the_sse_otherwise(when: str,
                                                                                  rounds: list[int]) -> None:
    cfg = fedloge_cfg(**{"fedloge-realign": when, "num-server-rounds": 3})
    model = toy_model(0)
    server = FedLoGeServer(cfg, model, None)  # type: ignore[arg-type]
    asked = []
    x = torch.rand(3, 1, 1, P, generator=torch.Generator().manual_seed(0))
    for server_round in (1, 2, 3):
        if REALIGN in server.broadcast(server_round, model):
            asked.append(server_round)
            assert server.evaluation_model(model) is not model
        else:
            assert server.evaluation_model(model) is model
            with torch.no_grad():
                np.testing.assert_allclose(model(x).double().numpy(),
                                           features(model, x) @ model.classifier.sse.double().numpy().T, rtol=1e-5)
    assert asked == rounds


def test_config_names_the_key_and_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match="fedloge-realign: must be one of every-round, last-round, off"):
        fedloge_cfg(**{"fedloge-realign": "final"})
    with pytest.raises(ConfigError, match=r"fedloge-sparsity: must be in \[0.0, 1.0\)"):
        fedloge_cfg(**{"fedloge-sparsity": 1.0})
    with pytest.raises(ConfigError, match="fedloge-gha-norm: must be > 0"):
        fedloge_cfg(**{"fedloge-gha-norm": 0.0})
    with pytest.raises(ConfigError, match="fedloge-sse-norm: must be > 0"):
        fedloge_cfg(**{"fedloge-sse-norm": -1.0})
    with pytest.raises(ConfigError, match="fedloge-sse-steps: must be >= 0"):
        fedloge_cfg(**{"fedloge-sse-steps": -1})
    cfg = resolve({})
    assert (cfg.fedloge_sparsity, cfg.fedloge_sse_norm, cfg.fedloge_sse_steps, cfg.fedloge_gha_norm) == \
        (0.6, 0.1, 10000, 1.7)
    assert get_method("fedloge").client is FedLoGeClient
    with pytest.raises(ValueError, match="needs its heads"):
        FedLoGeServer(cfg, build_model("cnn", 10, 1, 28), None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the ClientApp's reply

RUN_CONFIG = {"method": "fedloge", "samples-per-class": 20, "imbalance-ratio": 2.0, "device": "cpu",
              "precision": "fp32", "local-epochs": 1, "fedloge-sse-steps": STEPS}


def test_the_train_reply_carries_backbone_and_aux_and_the_node_keeps_its_local_head(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = resolve(RUN_CONFIG)
    data = federated_data(cfg, 2)
    start = initial_model(cfg, data).travelling_state()
    metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    message = Message(content=RecordDict({"arrays": ArrayRecord(start),
                                          "config": ConfigRecord({"server-round": 1})}), metadata=metadata)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config=dict(RUN_CONFIG))
    started_from: list[dict[str, np.ndarray]] = []
    original_begin = FedLoGeClient.begin

    def spy(self, model, images, labels, generator):  # type: ignore[no-untyped-def]
        started_from.append(dict(self.state))
        original_begin(self, model, images, labels, generator)

    monkeypatch.setattr(FedLoGeClient, "begin", spy)
    reply = client_app.train(message, context)
    assert set(reply.content["arrays"].keys()) == set(start)
    assert not any("local" in k for k in start)
    assert content_parameters(reply.content) == 1_199_882  # the cnn's: g_aux replaces its linear classifier
    assert 0.0 <= reply.content["metrics"]["personalised-accuracy"] <= 1.0
    assert CLIENT_STATE_KEY in context.state
    kept = load_client_state(context.state)
    assert kept[LOCAL_WEIGHT].shape == (10, 128) and kept[LOCAL_BIAS].shape == (10,)
    # the node's next round starts from the local head it kept (and the reply still carries no local head)
    message.content["config"]["server-round"] = 2
    reply = client_app.train(message, context)
    assert set(reply.content["arrays"].keys()) == set(start)
    assert started_from[0] == {}
    np.testing.assert_array_equal(started_from[1][LOCAL_WEIGHT], kept[LOCAL_WEIGHT])
    assert not np.array_equal(load_client_state(context.state)[LOCAL_WEIGHT], kept[LOCAL_WEIGHT])


def test_heads_module_forward_is_the_sse_logits() -> None:
    heads = FedLoGeHeads(nn.Linear(D, C))
    assert torch.isnan(heads.sse).all()  # until a node installs the run's SSE-C
    heads.install_sse(torch.eye(C, D))
    h = torch.rand(2, D)
    torch.testing.assert_close(heads(h), h[:, :C])


# ---------------------------------------------------------------- through the real apps (in process)


def test_fedloge_run_records_personalised_accuracy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = ("method='fedloge' samples-per-class=60 imbalance-ratio=10.0 num-server-rounds=2 "
              "fedloge-sse-steps=200 "
              f"output-dir='{tmp_path / 'out'}' run-name='fedloge'")
    assert run_in_process(tmp_path, monkeypatch, config, num_clients=2) == 0
    run_dir = tmp_path / "out" / "fedloge"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    per_client = sum(v.numel() for v in build_model("cnn", 10, 1, 28).state_dict().values())
    for row in rows:
        assert row["parameters_up"] == row["parameters_down"] == 2 * per_client  # SSE-C and local heads never
        assert len(row["personalised_accuracy_per_client"]) == len(row["clients"]) == 2
        assert row["personalised_accuracy"] == pytest.approx(np.mean(row["personalised_accuracy_per_client"]))
        assert row["fedloge_aux_norm_ratio"] >= 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final_personalised_accuracy"] == rows[-1]["personalised_accuracy"]


def test_a_realigned_head_keeps_its_class_mask_on_its_own_device() -> None:
    """Found on a GPU (results/gpu-check): the default all-held mask was made on the CPU beside GPU weights.
    The meta device stands in for the GPU here: any device but the CPU shows where the mask lives."""
    weight, bias = torch.zeros(3, 4, device="meta"), torch.zeros(3, device="meta")
    assert RealignedHead(weight, bias).held.device.type == "meta"
    assert RealignedHead(weight, bias, torch.tensor([True, False, True])).held.device.type == "meta"
    head = RealignedHead(torch.eye(3, 4), torch.zeros(3), torch.tensor([True, False, True]))
    logits = head(torch.ones(2, 4))
    assert torch.isinf(logits[:, 1]).all() and torch.isfinite(logits[:, [0, 2]]).all()


def test_fedloge_under_secure_aggregation_matches_a_plain_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FedLoGe's server needs only the weighted model average (backbone and g_aux; the local heads and the SSE-C
    never travel), so secagg gives the plain run's model up to the codec's steps, and the personalised accuracy
    travels masked: the cohort's mean only."""
    runs = run_off_and_secagg(tmp_path, monkeypatch, "method='fedloge' samples-per-class=60 imbalance-ratio=10.0 "
                              "num-server-rounds=2 fedloge-sse-steps=200 precision='fp32'", run_name="fedloge")
    rows = {mode: [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
            for mode, folder in runs.items()}
    for plain, secure in zip(rows["off"], rows["secagg"], strict=True):
        assert abs(secure["accuracy"] - plain["accuracy"]) < 0.02
        assert secure["personalised_accuracy"] == pytest.approx(plain["personalised_accuracy"], abs=0.02)
        assert "personalised_accuracy_per_client" not in secure  # per client: never under secagg
        assert secure["fedloge_aux_norm_ratio"] == pytest.approx(plain["fedloge_aux_norm_ratio"], rel=1e-3)
    secure_model = torch.load(runs["secagg"] / "final_model.pt", weights_only=False)["state"]
    plain_model = torch.load(runs["off"] / "final_model.pt", weights_only=False)["state"]
    assert sorted(secure_model) == sorted(plain_model)
    for key, value in plain_model.items():  # two rounds of codec steps, amplified by one round of training
        np.testing.assert_allclose(np.asarray(secure_model[key], np.float64), np.asarray(value, np.float64),
                                   atol=1e-3, err_msg=key)
