"""Methods whose server needs per-class sums (RedGrape, GRAPE-LA, CReFF) under secure aggregation, on the
in-process grid: the server state after a secure round equals the state after the same round's plain
replies, up to the fixed-point bound, and holder / class counts exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from test_secagg_strategy import NODES, InProcessGrid, task_identity  # noqa: F401 (a fixture)
from torch import nn

from fedlt_app.config import resolve
from fedlt_app.methods import get_method
from fedlt_app.methods.decoupled.creff import CReFFServer
from fedlt_app.models import EncoderClassifier
from fedlt_app.records import payload_to_record, record_to_payload
from fedlt_app.secagg import flower_client
from fedlt_app.secagg.fixedpoint import FixedPoint
from fedlt_app.secagg.flower_server import RECORD, SecureRounds
from fedlt_app.strategy import METHOD_KEY, FedLTStrategy, server_optimizer

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
                         secure=SecureRounds(3, timeout=10.0) if secure else None)


def model_arrays(strategy: FedLTStrategy) -> ArrayRecord:
    """The strategy's global model as the arrays Flower's loop would hand it."""
    state = strategy.global_model.travelling_state()
    return ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in state.items()})


def client_reply(method: str, message: Message, grid: InProcessGrid, secure: bool) -> Message:
    """What the ClientApp would answer, without the training loop: the method's report on the received model
    (random local data of the partition's classes) and a perturbed model."""
    node = message.metadata.dst_node_id
    partition = next(p for p, n in NODES.items() if n == node)
    rng = np.random.default_rng([partition, int(message.content["config"]["server-round"])])
    labels = torch.from_numpy(rng.choice(HELD[partition], size=40)).long()
    images = torch.from_numpy(rng.integers(0, 256, (40, 1, SIDE, SIDE), dtype=np.uint8))
    model = get_method(method).extend_model(EncoderClassifier(nn.Flatten(), SIDE * SIDE, CLASSES))
    model.load_travelling_state(message.content["arrays"].to_torch_state_dict())
    cfg = resolve({"method": method})
    client = get_method(method).client(cfg, CLASSES, record_to_payload(message.content.get(METHOD_KEY)))
    client.begin(model, images, labels, torch.Generator().manual_seed(int(rng.integers(2**31))))
    local = {k: (v.detach().numpy() + rng.normal(0, 0.05, v.shape)).astype(v.detach().numpy().dtype)
             for k, v in model.travelling_state().items()}  # in the model's dtypes, as a real client's
    if secure:
        return Message(flower_client.masked_train_reply(message, grid.contexts[node], local, len(labels), 0.7,
                                                        partition, client.summands()), reply_to=message)
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in local.items()}),
                               "metrics": MetricRecord({"num-examples": len(labels), "train-loss": 0.7}),
                               METHOD_KEY: payload_to_record(client.report())}), reply_to=message)


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
def test_prototype_store_equals_plain_aggregation(task_identity, method: str, record_property) -> None:  # noqa: F811
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
        assert np.array_equal(s.count_total, p.count_total) and s.count_total.sum() == 40 * (len(NODES) - 1)
    # the train messages named the method's sums; the clients sent one masked vector each, nothing else
    assert all(set(m.content[RECORD].keys()) == {"nodes", "ciphertexts", "segments"} for m in messages)
    model_values = sum(v.numpy().size for v in secure_arrays.values())
    method_values = CLASSES * (CLASSES * SIDE * SIDE + CLASSES + 1) + (CLASSES if method == "grape-la" else 0)
    assert secure.current.parameters_up == (len(NODES) - 1) * (3 + model_values + method_values)


def test_creff_mean_real_gradients_equal_plain_aggregation(task_identity, monkeypatch) -> None:  # noqa: F811
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


def test_a_client_whose_method_gives_other_sums_refuses_to_pack(task_identity) -> None:  # noqa: F811
    strategy = _strategy("redgrape", secure=True)
    grid = InProcessGrid()
    theta = model_arrays(strategy)
    message = next(iter(strategy.configure_train(1, theta, ConfigRecord(), grid)))
    local = {k: v.numpy() for k, v in theta.items()}
    with pytest.raises(ValueError, match=r"asks for the sums \['proto-bias', 'proto-holders', 'proto-weight'\], "
                                         r"this client's method gives \[\]"):
        flower_client.masked_train_reply(message, grid.contexts[message.metadata.dst_node_id], local, 10, 0.1, 0)
