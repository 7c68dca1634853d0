"""Secure aggregation through fedlt's strategy and the ClientApp's handlers, on an in-process grid
(no Ray): the query rounds, masked train replies, dropouts, the failure policy and the config keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from torch import nn

from fedlt_app.config import ConfigError, resolve
from fedlt_app.methods import ServerMethod
from fedlt_app.models import EncoderClassifier
from fedlt_app.secagg import flower_client
from fedlt_app.secagg.flower_server import QUERY_KEYS, QUERY_SHARES, QUERY_UNMASK, RECORD, SecureRounds
from fedlt_app.strategy import ClientFailures, FedLTStrategy, server_optimizer

NODES = {p: 500 + 7 * p for p in range(7)}  # partition -> node id
HANDLERS = {f"query.{QUERY_KEYS}": flower_client.handle_keys, f"query.{QUERY_SHARES}": flower_client.handle_shares,
            f"query.{QUERY_UNMASK}": flower_client.handle_unmask}



class InProcessGrid:
    """Answers the protocol's queries with the real ClientApp handlers; ``fail`` maps query -> failing nodes."""

    def __init__(self, fail: dict[str, set[int]] | None = None) -> None:
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                         for n in NODES.values()}
        self.fail = fail or {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout):  # type: ignore[no-untyped-def]
        replies = []
        for m in messages:
            kind, node = m.metadata.message_type, m.metadata.dst_node_id
            if node in self.fail.get(kind.split(".")[-1], set()):
                replies.append(Message(Error(code=0, reason="injected failure"), reply_to=m))
            else:
                replies.append(HANDLERS[kind](m, self.contexts[node]))
        return replies


def _strategy(min_cohort: int = 3, optimizer: str = "fedavg", lr: float = 1.0, secure: bool = True
              ) -> tuple[FedLTStrategy, EncoderClassifier]:
    torch.manual_seed(0)
    model = EncoderClassifier(nn.Flatten(), 4, 3)
    cfg = resolve({"method": "fedavg", "secure-aggregation": "secagg"})
    return FedLTStrategy(server_optimizer(optimizer, lr, 0.9, 0.01), ServerMethod(cfg, model, None), model, NODES,
                         0, 0, max_failure_fraction=0.5,
                         secure=SecureRounds(min_cohort, timeout=10.0) if secure else None), model


def _round(strategy, model, grid, fail_train=frozenset(), seed=0):  # type: ignore[no-untyped-def]
    """One round; returns (new arrays, the clients' local arrays and counts, the train replies' contents)."""
    rng = np.random.default_rng(seed)
    theta = {k: v.detach().numpy().copy() for k, v in model.travelling_state().items()}
    messages = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in theta.items()}),
                                             ConfigRecord(), grid))
    local, counts, replies = {}, {}, []
    for m in messages:
        node = m.metadata.dst_node_id
        if node in fail_train:
            replies.append(Message(Error(code=0, reason="injected failure"), reply_to=m))
            continue
        local[node] = {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in theta.items()}
        counts[node] = int(rng.integers(5, 50))
        content = flower_client.masked_train_reply(m, grid.contexts[node], local[node], counts[node], 0.5, node)
        replies.append(Message(content, reply_to=m))
    contents = [r.content for r in replies if not r.has_error()]
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays, local, counts, contents


def test_a_secure_round_gives_fedavg_of_the_survivors_and_sends_nothing_else(task_identity) -> None:
    strategy, model = _strategy()
    grid = InProcessGrid(fail={QUERY_KEYS: {NODES[2]}})  # + 1 in training: threshold 5 of 7 tolerates 2
    arrays, local, counts, contents = _round(strategy, model, grid, fail_train={NODES[5]})
    assert set(local) == {NODES[p] for p in (0, 1, 3, 4, 6)}  # 2 dropped at keys, 5 in training
    assert all(set(c) == {RECORD} and set(c[RECORD]) == {"masked"} for c in contents)  # only the masked vector
    total = sum(counts.values())
    for key, value in arrays.items():
        plain = sum(counts[n] * local[n][key].astype(np.float64) for n in local) / total
        np.testing.assert_allclose(value.numpy(), plain, rtol=0, atol=len(local) / 2**24 / total + 1e-6)
    log = strategy.current
    assert sorted(log.failed) == [2, 5] and log.bytes_up > 0 and log.bytes_down > 0
    # up travel the masked vectors (n, clipped count, n * loss and every model value, as int64) and the protocol
    vector = contents[0][RECORD]["masked"].numpy()
    assert vector.size == 3 + sum(v.numpy().size for v in arrays.values()) and vector.dtype == np.int64
    assert log.parameters_up == len(local) * vector.size
    assert log.bytes_up > sum(c[RECORD]["masked"].numpy().nbytes for c in contents)


@pytest.mark.parametrize("optimizer", ["fedavg", "fedavgm", "fedadam"])
def test_every_server_optimizer_steps_as_on_the_plain_replies(task_identity, optimizer) -> None:
    strategy, model = _strategy(optimizer=optimizer, lr=0.5)
    arrays, local, counts, _ = _round(strategy, model, InProcessGrid(), fail_train={NODES[3]})
    plain, plain_model = _strategy(optimizer=optimizer, lr=0.5, secure=False)
    theta = ArrayRecord({k: Array(v.detach().numpy().copy()) for k, v in plain_model.travelling_state().items()})
    messages = {m.metadata.dst_node_id: m for m in plain.configure_train(1, theta, ConfigRecord(), InProcessGrid())}
    replies = [Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in local[n].items()}),
                                   "metrics": MetricRecord({"num-examples": counts[n], "train-loss": 0.5})}),
                       reply_to=messages[n]) for n in local]
    expected, _ = plain.aggregate_train(1, replies)
    for key in expected:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key].numpy(), rtol=0, atol=1e-6)


def test_too_few_clients_fail_the_round_with_the_reason(task_identity) -> None:
    strategy, model = _strategy()
    grid = InProcessGrid(fail={QUERY_SHARES: {NODES[0], NODES[1], NODES[2]}})
    with pytest.raises(ClientFailures, match=r"stage 'share-keys': 4 of 7 clients answered, threshold is 5"):
        _round(strategy, model, grid)
    strategy, model = _strategy(min_cohort=8)
    with pytest.raises(ClientFailures, match="7 clients, fewer than secagg-min-cohort=8"):
        _round(strategy, model, InProcessGrid())


def test_a_client_refuses_to_train_unmasked_when_the_server_skips_the_protocol(task_identity) -> None:
    strategy, model = _strategy()
    grid = InProcessGrid()
    theta = ArrayRecord({k: Array(v.detach().numpy()) for k, v in model.travelling_state().items()})
    message = next(iter(strategy.configure_train(1, theta, ConfigRecord(), grid)))
    message.content.pop(RECORD)
    with pytest.raises(RuntimeError, match="refusing to send an unmasked update"):
        flower_client.masked_train_reply(message, grid.contexts[message.metadata.dst_node_id],
                                         {k: v.numpy() for k, v in theta.items()}, 10, 0.1, 0)


def test_keys_are_validated_and_methods_needing_per_client_values_refused() -> None:
    assert resolve({}).secure_aggregation == "off"
    with pytest.raises(ConfigError, match="secure-aggregation: must be one of off, secagg"):
        resolve({"secure-aggregation": "on"})
    with pytest.raises(ConfigError, match=r"secure-aggregation: 'secagg' cannot run method='climb': .*each client's"):
        resolve({"secure-aggregation": "secagg", "method": "climb"})
    for method in ("fedic", "capt"):  # their servers read each client's model
        with pytest.raises(ConfigError, match=rf"method='{method}': its server reads each client's model"):
            resolve({"secure-aggregation": "secagg", "method": method, "fedic-server-data": "heldout",
                     "clip-weights": "/weights/clip.pt"})
    for method in ("fedloge", "fedyoyo", "rucr", "promptfl"):  # each has its secure path
        assert resolve({"secure-aggregation": "secagg", "method": method, "clip-weights": "/weights/clip.pt"}
                       ).method == method
    for method in ("redgrape", "grape-la", "creff"):  # their servers need per-class sums and holder counts
        assert resolve({"secure-aggregation": "secagg", "method": method}).method == method
    with pytest.raises(ConfigError, match="secagg-min-cohort"):
        resolve({"secure-aggregation": "secagg", "method": "fedavg", "secagg-min-cohort": 1})
