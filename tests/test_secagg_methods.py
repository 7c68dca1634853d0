"""Methods whose server needs sums beyond the weighted model sum (RedGrape, GRAPE-LA, CReFF, FedNH, Fed-GraB),
with another client weighting (FedNH: unweighted) or with personalised accuracies (FedETF, FedNH) under secure
aggregation, on the in-process grid: the server state after a secure round equals the state after the same
round's plain replies, up to the fixed-point bound, and holder / class counts exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from test_secagg_strategy import NODES, InProcessGrid
from torch import nn

from fedlt_app.config import resolve
from fedlt_app.methods import get_method
from fedlt_app.methods.decoupled.creff import CReFFServer
from fedlt_app.methods.representation.moon import PREVIOUS_MODEL
from fedlt_app.models import EncoderClassifier
from fedlt_app.records import payload_to_record, record_to_payload
from fedlt_app.secagg import flower_client
from fedlt_app.secagg.fixedpoint import FixedPoint
from fedlt_app.secagg.flower_server import RECORD, SecureRounds
from fedlt_app.secagg.update import fedavg_layout, metric_segments, pack_update, unpack_average, unpack_metric_means
from fedlt_app.strategy import METHOD_KEY, FedLTStrategy, masked_metrics, server_optimizer

CLASSES, SIDE = 10, 4  # 1x4x4 grey images: 16 features
STEP = 1 / FixedPoint().scale  # a mean over holders is off by less than one fixed-point step
HELD = {p: [c for c in range(8) if (c + p) % 3] for p in NODES}  # class 9: nobody
HELD[6] = [0, 8]  # class 8: partition 6 alone (README: a lone holder's prototype is revealed)
FAILS = NODES[4]  # drops in training: neither path counts it


def _strategy(method: str, secure: bool) -> FedLTStrategy:
    torch.manual_seed(0)
    spec = get_method(method)
    model = spec.extend_model(EncoderClassifier(nn.Flatten(), SIDE * SIDE, CLASSES))
    cfg = resolve({"method": method, "secure-aggregation": "secagg" if secure else "off"})
    server = spec.server(cfg, model, None)
    return FedLTStrategy(server_optimizer("fedavg", 1.0, 0.0, 0.01), server, model, NODES, 0, 0,
                         secure=SecureRounds(3, timeout=10.0, metrics=masked_metrics(spec.client)) if secure else None)


def model_arrays(strategy: FedLTStrategy) -> ArrayRecord:
    """The strategy's global model as the arrays Flower's loop would hand it."""
    state = strategy.global_model.travelling_state()
    return ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in state.items()})


def examples(partition: int) -> int:
    """40 local samples, except in the runs that need the clients' weights to differ (``SIZES``)."""
    return 40


# Methods whose test sends local-set sizes that differ (a weighted and an unweighted mean must then differ),
# and a per-partition personalised accuracy (the methods with personalised models).
SIZES = {"fednh": lambda p: 20 + 7 * p, "fedetf": lambda p: 20 + 7 * p, "fedgrab": lambda p: 20 + 7 * p}


def personalised_accuracy(partition: int) -> float:
    return 0.3 + 0.07 * partition


def client_reply(method: str, message: Message, grid: InProcessGrid, secure: bool) -> Message:
    """What the ClientApp would answer, without the training loop: the method's report on the received model
    (random local data of the partition's classes) and a perturbed model. Fed-GraB takes two loss steps first
    (its controllers move, so its reported weights differ between clients); methods with personalised models
    report a personalised accuracy (in the clear, or masked), beside a metric secure aggregation drops."""
    node = message.metadata.dst_node_id
    partition = next(p for p, n in NODES.items() if n == node)
    rng = np.random.default_rng([partition, int(message.content["config"]["server-round"])])
    size = SIZES.get(method, examples)(partition)
    labels = torch.from_numpy(rng.choice(HELD[partition], size=size)).long()
    images = torch.from_numpy(rng.integers(0, 256, (size, 1, SIDE, SIDE), dtype=np.uint8))
    model = get_method(method).extend_model(EncoderClassifier(nn.Flatten(), SIDE * SIDE, CLASSES))
    model.load_travelling_state(message.content["arrays"].to_torch_state_dict())
    cfg = resolve({"method": method})
    state = None
    if method == "moon" and partition % 2 == 0:  # MOON: half the clients hold a previous local model
        state = {PREVIOUS_MODEL + k: (v.detach().numpy() + rng.normal(0, 0.3, v.shape)).astype(np.float32)
                 for k, v in model.state_dict().items()}
    client = get_method(method).client(cfg, CLASSES, record_to_payload(message.content.get(METHOD_KEY)), state)
    client.begin(model, images, labels, torch.Generator().manual_seed(int(rng.integers(2**31))))
    for _ in range(2 if method in ("fedgrab", "moon") else 0):  # Fed-GraB: the second step's weights answer
        client.loss(model, images.float().flatten(1) / 255, labels)  # the first's gradients; MOON: its term
    local = {k: (v.detach().numpy() + rng.normal(0, 0.05, v.shape)).astype(v.detach().numpy().dtype)
             for k, v in model.travelling_state().items()}  # in the model's dtypes, as a real client's
    metrics = MetricRecord({"num-examples": len(labels), "train-loss": 0.7, "train-seconds": 1.0 + partition})
    if client.personalised_model(model) is not None:
        metrics["personalised-accuracy"] = personalised_accuracy(partition)
    if secure:
        return Message(flower_client.masked_train_reply(message, grid.contexts[node], local, len(labels), 0.7,
                                                        partition, client.summands(), dict(metrics)), reply_to=message)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in local.items()}), "metrics": metrics})
    if client.report():
        content[METHOD_KEY] = payload_to_record(client.report())
    return Message(content, reply_to=message)


def _round(method: str, secure: bool) -> tuple[FedLTStrategy, ArrayRecord, list[Message]]:
    strategy = _strategy(method, secure)
    grid = InProcessGrid()
    theta = model_arrays(strategy)
    messages = list(strategy.configure_train(1, theta, ConfigRecord(), grid))
    replies = [Message(Error(code=0, reason="injected"), reply_to=m) if m.metadata.dst_node_id == FAILS
               else client_reply(method, m, grid, secure) for m in messages]
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, arrays, messages


def _largest_error(secure: np.ndarray, plain: np.ndarray) -> float:
    return float(np.abs(np.asarray(secure, np.float64) - np.asarray(plain, np.float64)).max())


@pytest.mark.parametrize("method", ["redgrape", "grape-la"])
def test_prototype_store_equals_plain_aggregation(task_identity, method: str, record_property) -> None:
    plain, plain_arrays, _ = _round(method, secure=False)
    secure, secure_arrays, messages = _round(method, secure=True)
    p, s = plain.server_method, secure.server_method
    assert np.array_equal(s.known, p.known) and not s.known[9] and s.known[8]
    errors = [_largest_error(s.weight[s.known], p.weight[p.known]), _largest_error(s.bias[s.known], p.bias[p.known])]
    record_property("largest_prototype_error", max(errors))
    print(f"{method}: largest prototype error {max(errors):.3g}")
    assert max(errors) < STEP + 2e-7 * max(np.abs(p.weight).max(), np.abs(p.bias).max())  # + float32 storage
    assert not s.weight[9].any()  # nobody holds it: the store keeps its (zero) value
    for key in plain_arrays:
        np.testing.assert_allclose(secure_arrays[key].numpy(), plain_arrays[key].numpy(), rtol=0, atol=STEP + 1e-6)
    if method == "grape-la":
        totals = s.prior.count_total, p.prior.count_total
        assert np.array_equal(*totals) and totals[0].sum() == 40 * (len(NODES) - 1)
    # the train messages named the method's sums; the clients sent one masked vector each, nothing else
    assert all(set(m.content[RECORD].keys()) == {"nodes", "ciphertexts", "segments"} for m in messages)
    model_values = sum(v.numpy().size for v in secure_arrays.values())
    method_values = CLASSES * (CLASSES * SIDE * SIDE + CLASSES + 1) + (CLASSES if method == "grape-la" else 0)
    assert secure.current.parameters_up == (len(NODES) - 1) * (3 + model_values + method_values)


def test_creff_mean_real_gradients_equal_plain_aggregation(task_identity, monkeypatch) -> None:
    seen: dict[str, dict] = {}
    monkeypatch.setattr(CReFFServer, "absorb_real", lambda self, real: seen.setdefault(
        "secure" if self.cfg.secure_aggregation == "secagg" else "plain", real))
    _round("creff", secure=False)
    _round("creff", secure=True)
    plain, secure = seen["plain"], seen["secure"]
    assert sorted(secure) == sorted(plain) == [c for c in range(9)]  # classes reported this round, in order
    for c, (weight, bias) in plain.items():
        np.testing.assert_allclose(secure[c][0].numpy(), weight.numpy(), rtol=2e-7, atol=STEP)
        np.testing.assert_allclose(secure[c][1].numpy(), bias.numpy(), rtol=2e-7, atol=STEP)


def test_a_client_whose_method_gives_other_sums_refuses_to_pack(task_identity) -> None:
    strategy = _strategy("redgrape", secure=True)
    grid = InProcessGrid()
    theta = model_arrays(strategy)
    message = next(iter(strategy.configure_train(1, theta, ConfigRecord(), grid)))
    local = {k: v.numpy() for k, v in theta.items()}
    with pytest.raises(ValueError, match=r"asks for the sums \['proto-bias', 'proto-holders', 'proto-weight'\], "
                                         r"this client's method gives \[\]"):
        flower_client.masked_train_reply(message, grid.contexts[message.metadata.dst_node_id], local, 10, 0.1, 0)


def _model_errors(secure_arrays: ArrayRecord, plain_arrays: ArrayRecord) -> float:
    """The largest difference of the new global models (every array, the fixed-point bound and float32 apart)."""
    assert sorted(secure_arrays) == sorted(plain_arrays)
    return max(_largest_error(secure_arrays[k].numpy(), plain_arrays[k].numpy()) for k in plain_arrays)


def _weighted_means(messages: list[Message], method: str, uniform: bool) -> dict[str, np.ndarray]:
    """The model mean of the clients that succeeded, recomputed from their replies (weights n or 1)."""
    replies = [client_reply(method, m, InProcessGrid(), secure=False) for m in messages
               if m.metadata.dst_node_id != FAILS]
    weights = np.array([1.0 if uniform else r.content["metrics"]["num-examples"] for r in replies])
    return {k: sum(w * r.content["arrays"][k].numpy().astype(np.float64) for w, r in zip(weights, replies))
            / weights.sum() for k in replies[0].content["arrays"]}


def test_fednh_unweighted_average_and_prototypes_equal_plain_aggregation(task_identity, record_property) -> None:
    """FedNH: the unweighted model mean (weight 1 per client, not n) and the prototypes moved by the summed
    per-class semantics and counts; the counts exactly."""
    plain, plain_arrays, _ = _round("fednh", secure=False)
    secure, secure_arrays, messages = _round("fednh", secure=True)
    p, s = plain.server_method, secure.server_method
    assert s.updated_classes == p.updated_classes == 9  # class 9: nobody
    prototype_error = _largest_error(s.prototypes, p.prototypes)
    model_error = _model_errors(secure_arrays, plain_arrays)
    assert prototype_error < STEP + 6e-8  # + one float32 rounding of the stored prototypes
    assert model_error < STEP + 1e-6
    np.testing.assert_array_equal(s.prototypes[9], p.prototypes[9])  # held by nobody: kept as it was
    initial = _strategy("fednh", secure=False).server_method.prototypes
    assert np.abs(s.prototypes[:9] - initial[:9]).min(axis=1).max() > 0  # and every held one moved
    # the unweighted mean, not the n-weighted one (the clients' sizes differ)
    unweighted = _weighted_means(messages, "fednh", uniform=True)
    weighted = _weighted_means(messages, "fednh", uniform=False)
    key = "classifier.scale"
    assert abs(secure_arrays[key].numpy()[0] - unweighted[key][0]) < STEP + 1e-6
    assert abs(unweighted[key][0] - weighted[key][0]) > 1e-4
    # the train messages named the weighting and the sums; the personalised accuracy: the cohort mean alone
    assert all(set(m.content[RECORD].keys()) == {"nodes", "ciphertexts", "segments", "weighting"} for m in messages)
    _assert_personalised_mean_only(plain, secure)
    record_property("largest_error", max(prototype_error, model_error))
    print(f"fednh: largest prototype error {prototype_error:.3g}, model error {model_error:.3g}")


def _assert_personalised_mean_only(plain: FedLTStrategy, secure: FedLTStrategy) -> None:
    survivors = [p for p in NODES if NODES[p] != FAILS]
    expected = float(np.mean([personalised_accuracy(p) for p in survivors]))
    plain_metrics, secure_metrics = plain.current.personalised_metrics(), secure.current.personalised_metrics()
    assert plain_metrics["personalised_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert len(plain_metrics["personalised_accuracy_per_client"]) == len(NODES)
    assert set(secure_metrics) == {"personalised_accuracy"}  # no per-client values on the server
    assert abs(secure_metrics["personalised_accuracy"] - expected) < STEP


def test_fedetf_weighted_average_and_masked_personalised_accuracy(task_identity, record_property) -> None:
    """FedETF: the n-weighted mean (β included) and the personalised accuracy's cohort mean from its masked sum;
    the masked vector holds the model, the three counters and the metric's sum and count, nothing else (the
    per-client train time is dropped)."""
    plain, plain_arrays, _ = _round("fedetf", secure=False)
    secure, secure_arrays, messages = _round("fedetf", secure=True)
    error = _model_errors(secure_arrays, plain_arrays)
    assert error < STEP + 1e-6
    weighted = _weighted_means(messages, "fedetf", uniform=False)
    assert abs(secure_arrays["classifier.temperature"].numpy()[0] - weighted["classifier.temperature"][0]) < 1e-6
    _assert_personalised_mean_only(plain, secure)
    assert all(set(m.content[RECORD].keys()) == {"nodes", "ciphertexts", "segments"} for m in messages)
    model_values = sum(v.numpy().size for v in secure_arrays.values())
    assert secure.current.parameters_up == (len(NODES) - 1) * (3 + model_values + 2)
    assert secure.current.train_loss == pytest.approx(0.7)
    record_property("largest_error", error)
    print(f"fedetf: largest model error {error:.3g}")


def test_fedgrab_weighted_average_and_mean_pid_weights_equal_plain_aggregation(task_identity,
                                                                               record_property) -> None:
    """Fed-GraB: the n-weighted mean and the clients' mean last-step (w⁺, w⁻) from their masked sum and count."""
    plain, plain_arrays, _ = _round("fedgrab", secure=False)
    secure, secure_arrays, messages = _round("fedgrab", secure=True)
    p, s = plain.server_method.round_metrics(), secure.server_method.round_metrics()
    assert p["fedgrab_pos_weight"] != 1.0 and p["fedgrab_neg_weight"] != 1.0  # the controllers moved
    weight_error = max(abs(s[k] - p[k]) for k in ("fedgrab_pos_weight", "fedgrab_neg_weight"))
    model_error = _model_errors(secure_arrays, plain_arrays)
    assert weight_error < STEP and model_error < STEP + 1e-6
    assert s["fedgrab_balanced_classes"] == p["fedgrab_balanced_classes"]
    assert secure.current.personalised_metrics() == {}  # no personalised model: no metric segments
    model_values = sum(v.numpy().size for v in secure_arrays.values())
    assert secure.current.parameters_up == (len(NODES) - 1) * (3 + model_values + 2 + 1)
    record_property("largest_error", max(weight_error, model_error))
    print(f"fedgrab: largest PID weight error {weight_error:.3g}, model error {model_error:.3g}")


def test_moon_weighted_average_and_contrastive_metrics_equal_plain_aggregation(task_identity,
                                                                                 record_property) -> None:
    """MOON: the n-weighted mean, how many clients contrasted (exactly) and their mean term, from masked sums."""
    plain, plain_arrays, _ = _round("moon", secure=False)
    secure, secure_arrays, _ = _round("moon", secure=True)
    p, s = plain.server_method.round_metrics(), secure.server_method.round_metrics()
    holders = sum(1 for partition, node in NODES.items() if partition % 2 == 0 and node != FAILS)
    assert p["moon_clients_with_previous"] == s["moon_clients_with_previous"] == holders > 0
    assert p["moon_contrastive_loss"] > 0  # the term was on
    loss_error = abs(s["moon_contrastive_loss"] - p["moon_contrastive_loss"])
    model_error = _model_errors(secure_arrays, plain_arrays)
    assert loss_error < STEP and model_error < STEP + 1e-6
    assert secure.current.personalised_metrics() == {}
    model_values = sum(v.numpy().size for v in secure_arrays.values())
    assert secure.current.parameters_up == (len(NODES) - 1) * (3 + model_values + 1 + 1)
    record_property("largest_error", max(loss_error, model_error))


def test_the_new_sums_only_methods_are_accepted_under_secagg() -> None:
    for method in ("fedetf", "fednh", "fedgrab", "moon", "ccvr"):
        assert resolve({"secure-aggregation": "secagg", "method": method}).method == method


def test_masked_metrics_average_over_the_clients_that_report_them_and_others_are_dropped() -> None:
    """A client without the metric (a node with no test split) adds 0 and a count of 0; unnamed metrics never
    enter the vector; a uniform layout weighs each delta 1 and still n-weighs the loss."""
    g = {"w": np.zeros(3, np.float32)}
    layout = fedavg_layout(g, metric_segments(["personalised-accuracy"]), "uniform")
    clients = [({"w": np.full(3, 1.0, np.float32)}, 10, 0.5, {"personalised-accuracy": 0.25, "train-seconds": 9.0}),
               ({"w": np.full(3, 4.0, np.float32)}, 30, 1.0, {"personalised-accuracy": 0.75}),
               ({"w": np.full(3, 7.0, np.float32)}, 60, 2.0, {"train-seconds": 3.0})]
    vectors = [pack_update(layout, g, local, n, loss, np.random.default_rng(i), None, metrics)
               for i, (local, n, loss, metrics) in enumerate(clients)]
    assert all(v.size == 3 + 1 + 3 + 2 for v in vectors)  # n, clipped, loss, weight, the model, sum and count
    total = np.sum(vectors, axis=0, dtype=np.uint64)  # mod 2^64, as the unmasked sum
    assert unpack_metric_means(layout, total) == {"personalised-accuracy": pytest.approx(0.5, abs=STEP)}
    arrays, n, loss, clipped = unpack_average(layout, g, total)
    np.testing.assert_allclose(arrays["w"], 4.0, atol=STEP)  # (1 + 4 + 7) / 3: one per client
    assert n == 100 and loss == pytest.approx((5 + 30 + 120) / 100, abs=STEP) and clipped == 0
    nobody = fedavg_layout(g, metric_segments(["personalised-accuracy"]))
    alone = pack_update(nobody, g, clients[2][0], 60, 2.0, np.random.default_rng(0), None, clients[2][3])
    assert unpack_metric_means(nobody, alone) == {}  # nobody reported it: no value, not 0
