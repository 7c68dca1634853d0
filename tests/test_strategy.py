"""FedLTStrategy without Ray: a mock Grid and hand-built reply Messages.

Expected values (cohorts' node ids, per-class prototype means, weighted model
averages, server-lr steps, byte counts) are recomputed here with numpy from the
inputs, never read back from the code under test.
"""

from __future__ import annotations

import logging
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from torch import nn

from fedlt_app.config import resolve
from fedlt_app.data import FederatedData, ImageDataset
from fedlt_app.methods import ClientReport, ServerMethod
from fedlt_app.methods.decoupled.redgrape import RedGrapeServer
from fedlt_app.models import EncoderClassifier
from fedlt_app.strategy import METHOD_KEY, FedLTStrategy, sample_cohort, server_optimizer

NUM_CLIENTS = 10
NODE_OF_PARTITION = {p: 101 + p for p in range(NUM_CLIENTS)}
C, D = 4, 3  # classes, feature width of the toy model

pytestmark = pytest.mark.usefixtures("task_identity")  # tests/conftest.py: Messages need a run identity


# ---------------------------------------------------------------- sample_cohort


def test_sample_cohort_is_a_function_of_seed_and_round() -> None:
    assert sample_cohort(100, 10, 3, 7) == sample_cohort(100, 10, 3, 7)


def test_sample_cohort_differs_across_rounds_and_seeds() -> None:
    by_round = {tuple(sample_cohort(100, 10, 0, r)) for r in range(1, 21)}
    by_seed = {tuple(sample_cohort(100, 10, s, 1)) for s in range(20)}
    # 20 draws of 10 out of 100: a repeat is astronomically unlikely
    assert len(by_round) == 20
    assert len(by_seed) == 20


@pytest.mark.parametrize(("n", "k"), [(10, 1), (10, 3), (10, 9), (100, 10), (7, 6)])
def test_sample_cohort_size_and_range(n: int, k: int) -> None:
    for server_round in range(1, 6):
        cohort = sample_cohort(n, k, 1, server_round)
        assert len(cohort) == k
        assert len(set(cohort)) == k
        assert all(isinstance(p, int) and 0 <= p < n for p in cohort)
        assert cohort == sorted(cohort)


@pytest.mark.parametrize("k", [0, 10, 11, 50])
def test_sample_cohort_takes_everyone_when_k_is_zero_or_at_least_n(k: int) -> None:
    assert sample_cohort(10, k, 5, 3) == list(range(10))


def test_sample_cohort_covers_all_clients_over_rounds() -> None:
    seen = set()
    for server_round in range(1, 60):
        seen.update(sample_cohort(10, 2, 0, server_round))
    assert seen == set(range(10))


# ---------------------------------------------------------------- fixtures



def make_grid() -> Mock:
    grid = Mock()
    grid.get_node_ids.return_value = list(NODE_OF_PARTITION.values())
    return grid


def toy_model() -> EncoderClassifier:
    return EncoderClassifier(nn.Flatten(), D, C)


def toy_data(num_clients: int = NUM_CLIENTS) -> FederatedData:
    """A federation of ``num_clients`` clients, two (1, 1, D) images each, built in memory."""
    n = 2 * num_clients
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 1, D), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n) % C
    dataset = ImageDataset(
        name="fmnist", num_classes=C, train_images=images, train_labels=labels, test_images=images, test_labels=labels
    )
    return FederatedData(
        dataset=dataset,
        train_indices=np.arange(n),
        class_counts=tuple(int(k) for k in np.bincount(labels.numpy(), minlength=C)),
        client_indices=tuple(np.arange(2 * k, 2 * k + 2) for k in range(num_clients)),
    )


def make_strategy(
    method: str = "redgrape",
    clients_per_round: int = 0,
    server_lr: float = 1.0,
    seed: int = 0,
    server_opt: str = "fedavg",
    server_momentum: float = 0.9,
    model: EncoderClassifier | None = None,
    server_method: ServerMethod | None = None,
    max_failure_fraction: float = 0.99,
) -> FedLTStrategy:
    cfg = resolve({"method": method, "seed": seed})
    model = toy_model() if model is None else model
    if server_method is None:
        server_method = (RedGrapeServer if method == "redgrape" else ServerMethod)(cfg, model, toy_data())
    inner = server_optimizer(server_opt, server_lr, server_momentum, cfg.local_lr)
    return FedLTStrategy(inner, server_method, model, NODE_OF_PARTITION, clients_per_round, seed,
                         max_failure_fraction=max_failure_fraction)


def model_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weights shaped like ``toy_model()``'s state dict (the strategy loads them into it)."""
    return {
        "classifier.weight": rng.normal(size=(C, D)).astype(np.float32),
        "classifier.bias": rng.normal(size=(C,)).astype(np.float32),
    }


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _metadata(node_id: int) -> Metadata:
    return Metadata(
        run_id=1,
        message_id="",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=3600.0,
        message_type="train",
    )


def reply(
    partition: int,
    arrays: dict[str, np.ndarray],
    num_examples: int,
    loss: float,
    protos: tuple[list[int], np.ndarray, np.ndarray] | None = None,
) -> Message:
    content = RecordDict(
        {
            "arrays": to_record(arrays),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss}),
        }
    )
    if protos is not None:
        classes, weight, bias = protos
        content[METHOD_KEY] = to_record(
            {"proto-classes": np.asarray(classes, dtype=np.int64), "proto-weight": weight, "proto-bias": bias}
        )
    return Message(content=content, metadata=_metadata(NODE_OF_PARTITION[partition]))


def error_reply(partition: int, reason: str = "client crashed") -> Message:
    return Message(error=Error(code=0, reason=reason), metadata=_metadata(NODE_OF_PARTITION[partition]))


def random_protos(rng: np.random.Generator, classes: list[int]) -> tuple[list[int], np.ndarray, np.ndarray]:
    k = len(classes)
    return (
        classes,
        rng.normal(size=(k, C, D)).astype(np.float32),
        rng.normal(size=(k, C)).astype(np.float32),
    )


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


# ---------------------------------------------------------------- configure_train


@pytest.mark.parametrize(("clients_per_round", "seed"), [(3, 0), (3, 1), (5, 2), (0, 0)])
def test_configure_train_sends_to_exactly_the_cohort(clients_per_round: int, seed: int) -> None:
    strategy = make_strategy(clients_per_round=clients_per_round, seed=seed)
    theta = model_arrays(np.random.default_rng(0))
    for server_round in (1, 2, 3):
        messages = list(strategy.configure_train(server_round, to_record(theta), ConfigRecord(), make_grid()))
        cohort = sample_cohort(NUM_CLIENTS, clients_per_round, seed, server_round)
        expected_nodes = sorted(101 + p for p in cohort)
        assert sorted(m.metadata.dst_node_id for m in messages) == expected_nodes
        assert strategy.current.cohort == cohort
        assert strategy.current.server_round == server_round
        for m in messages:
            assert m.content["config"]["server-round"] == server_round
            got = {k: v.numpy() for k, v in m.content["arrays"].items()}
            assert got.keys() == theta.keys()
            assert all(np.array_equal(got[k], theta[k]) for k in theta)


def test_configure_train_without_broadcast_sends_no_method_record() -> None:
    for method in ("redgrape", "fedavg"):  # RedGrape has no prototypes before round 1's replies
        strategy = make_strategy(method=method)
        theta = model_arrays(np.random.default_rng(0))
        messages = list(strategy.configure_train(1, to_record(theta), ConfigRecord(), make_grid()))
        assert len(messages) == NUM_CLIENTS
        assert all(METHOD_KEY not in m.content for m in messages)
        assert strategy.current.bytes_down == NUM_CLIENTS * nbytes(theta)
        assert strategy.current.parameters_down == NUM_CLIENTS * sum(a.size for a in theta.values())


def test_configure_train_carries_the_broadcast_and_counts_its_bytes() -> None:
    rng = np.random.default_rng(1)
    strategy = make_strategy(clients_per_round=4)
    theta = model_arrays(rng)
    protos = random_protos(rng, [0, 2])
    strategy.configure_train(1, to_record(theta), ConfigRecord(), make_grid())
    cohort1 = strategy.current.cohort
    strategy.aggregate_train(1, [reply(cohort1[0], theta, 10, 1.0, protos)])

    messages = list(strategy.configure_train(2, to_record(theta), ConfigRecord(), make_grid()))
    assert len(messages) == 4
    for m in messages:
        record = m.content[METHOD_KEY]
        assert set(record.keys()) == {"proto-weight", "proto-bias", "proto-mask"}
        assert np.array_equal(record["proto-mask"].numpy(), np.array([True, False, True, False]))
        assert np.allclose(record["proto-weight"].numpy()[[0, 2]], protos[1])
        assert np.allclose(record["proto-bias"].numpy()[[0, 2]], protos[2])
    payload_bytes = C * C * D * 4 + C * C * 4 + C * 1  # float32 weight, float32 bias, bool mask
    assert strategy.current.bytes_down == 4 * (nbytes(theta) + payload_bytes)
    payload_params = C * C * D + C * C  # the mask is no parameter
    assert strategy.current.parameters_down == 4 * (sum(a.size for a in theta.values()) + payload_params)


# ---------------------------------------------------------------- aggregate_train


def weighted_average(arrays: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    total = float(sum(weights))
    return {
        key: sum(w * a[key].astype(np.float64) for a, w in zip(arrays, weights, strict=True)) / total
        for key in arrays[0]
    }


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def test_aggregate_train_averages_prototypes_per_class_unweighted_and_keeps_stale_ones() -> None:
    rng = np.random.default_rng(2)
    strategy = make_strategy()
    server: RedGrapeServer = strategy.server_method  # type: ignore[assignment]
    theta = model_arrays(rng)

    # Round 1: class 1 held by three clients (with very different sizes), 0 and 2 by one, 3 by nobody.
    strategy.configure_train(1, to_record(theta), ConfigRecord(), make_grid())
    p0, p1, p2 = random_protos(rng, [0, 1]), random_protos(rng, [1, 2]), random_protos(rng, [1])
    replies = [
        reply(0, model_arrays(rng), 1000, 0.5, p0),
        reply(1, model_arrays(rng), 10, 0.7, p1),
        reply(2, model_arrays(rng), 1, 0.9, p2),
    ]
    strategy.aggregate_train(1, replies)

    expect_w = np.zeros((C, C, D))
    expect_b = np.zeros((C, C))
    expect_w[0], expect_b[0] = p0[1][0], p0[2][0]
    expect_w[1] = (p0[1][1] + p1[1][0] + p2[1][0]) / 3
    expect_b[1] = (p0[2][1] + p1[2][0] + p2[2][0]) / 3
    expect_w[2], expect_b[2] = p1[1][1], p1[2][1]
    assert np.array_equal(server.known, [True, True, True, False])
    assert np.allclose(server.weight, expect_w, atol=1e-6)
    assert np.allclose(server.bias, expect_b, atol=1e-6)

    # Round 2: only classes 0 and 3 are reported; 1 and 2 keep round 1's values.
    strategy.configure_train(2, to_record(theta), ConfigRecord(), make_grid())
    q3, q0a, q0b = random_protos(rng, [3]), random_protos(rng, [0]), random_protos(rng, [0])
    strategy.aggregate_train(
        2,
        [
            reply(4, model_arrays(rng), 50, 0.1, q3),
            reply(5, model_arrays(rng), 5, 0.2, q0a),
            reply(6, model_arrays(rng), 500, 0.3, q0b),
        ],
    )
    expect_w[3], expect_b[3] = q3[1][0], q3[2][0]
    expect_w[0] = (q0a[1][0] + q0b[1][0]) / 2
    expect_b[0] = (q0a[2][0] + q0b[2][0]) / 2
    assert np.array_equal(server.known, [True, True, True, True])
    assert np.allclose(server.weight, expect_w, atol=1e-6)
    assert np.allclose(server.bias, expect_b, atol=1e-6)

    # and what round 3 broadcasts is that store
    (message, *_) = strategy.configure_train(3, to_record(theta), ConfigRecord(), make_grid())
    assert np.allclose(message.content[METHOD_KEY]["proto-weight"].numpy(), expect_w, atol=1e-6)
    assert np.all(message.content[METHOD_KEY]["proto-mask"].numpy())


def test_aggregate_train_gives_the_num_examples_weighted_average_at_server_lr_1() -> None:
    rng = np.random.default_rng(3)
    strategy = make_strategy(clients_per_round=3)
    theta = model_arrays(rng)
    strategy.configure_train(1, to_record(theta), ConfigRecord(), make_grid())
    cohort = strategy.current.cohort
    client_arrays = [model_arrays(rng) for _ in cohort]
    sizes, losses = [7, 100, 23], [2.0, 1.0, 0.5]
    replies = [
        reply(p, a, n, loss, random_protos(rng, [0]))
        for p, a, n, loss in zip(cohort, client_arrays, sizes, losses, strict=True)
    ]
    up_bytes = sum(nbytes(a) for a in client_arrays) + 3 * (8 + C * D * 4 + C * 4)  # int64 class + weight + bias
    arrays, metrics = strategy.aggregate_train(1, replies)

    expected = weighted_average(client_arrays, sizes)
    got = as_numpy(arrays)
    assert got.keys() == expected.keys()
    for key in expected:
        assert np.allclose(got[key], expected[key], atol=1e-5), key
    expected_loss = sum(n * loss for n, loss in zip(sizes, losses, strict=True)) / sum(sizes)
    assert strategy.current.train_loss == pytest.approx(expected_loss)
    assert float(metrics["train-loss"]) == pytest.approx(expected_loss)
    assert strategy.current.bytes_up == up_bytes
    assert strategy.current.parameters_up == sum(sum(v.size for v in a.values()) for a in client_arrays) + 3 * (
        C * D + C
    )
    assert strategy.current.failed == []


def test_aggregate_train_fedavg_method_without_method_records() -> None:
    rng = np.random.default_rng(4)
    strategy = make_strategy(method="fedavg")
    theta = model_arrays(rng)
    strategy.configure_train(1, to_record(theta), ConfigRecord(), make_grid())
    client_arrays = [model_arrays(rng) for _ in range(NUM_CLIENTS)]
    sizes = [int(n) for n in rng.integers(1, 200, size=NUM_CLIENTS)]
    replies = [reply(p, a, n, 1.0) for p, (a, n) in enumerate(zip(client_arrays, sizes, strict=True))]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = weighted_average(client_arrays, sizes)
    for key, value in as_numpy(arrays).items():
        assert np.allclose(value, expected[key], atol=1e-5), key


def test_server_lr_half_steps_halfway_from_the_sent_model() -> None:
    rng = np.random.default_rng(5)
    strategy = make_strategy(clients_per_round=2, server_lr=0.5)
    theta = model_arrays(rng)

    current = theta
    for server_round in (1, 2):
        strategy.configure_train(server_round, to_record(current), ConfigRecord(), make_grid())
        cohort = strategy.current.cohort
        client_arrays = [model_arrays(rng) for _ in cohort]
        sizes = [3, 9]
        replies = [reply(p, a, n, 1.0, random_protos(rng, [1]))
                   for p, a, n in zip(cohort, client_arrays, sizes, strict=True)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        avg = weighted_average(client_arrays, sizes)
        expected = {k: current[k] + 0.5 * (avg[k] - current[k]) for k in current}
        got = as_numpy(arrays)
        for key in expected:
            assert np.allclose(got[key], expected[key], atol=1e-5), (server_round, key)
        current = got


def test_failed_reply_is_skipped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(6)
    strategy = make_strategy(clients_per_round=4)
    server: RedGrapeServer = strategy.server_method  # type: ignore[assignment]
    theta = model_arrays(rng)
    strategy.configure_train(1, to_record(theta), ConfigRecord(), make_grid())
    cohort = strategy.current.cohort
    failing = cohort[1]
    ok = [p for p in cohort if p != failing]
    client_arrays = [model_arrays(rng) for _ in ok]
    sizes = [10, 20, 30]
    ok_protos = [random_protos(rng, [0]) for _ in ok]
    replies = [reply(p, a, n, 1.0, pr) for p, a, n, pr in zip(ok, client_arrays, sizes, ok_protos, strict=True)]
    replies.insert(1, error_reply(failing, "out of memory"))

    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    try:
        arrays, _ = strategy.aggregate_train(1, replies)
    finally:
        logger.removeHandler(caplog.handler)

    assert strategy.current.failed == [failing]
    assert any("out of memory" in r.getMessage() and str(failing) in r.getMessage() for r in caplog.records)
    expected = weighted_average(client_arrays, sizes)
    for key, value in as_numpy(arrays).items():
        assert np.allclose(value, expected[key], atol=1e-5), key
    # only the successful clients' prototypes are absorbed
    assert np.allclose(server.weight[0], np.mean([pr[1][0] for pr in ok_protos], axis=0), atol=1e-6)
    assert np.array_equal(server.known, [True, False, False, False])
    # bytes up count only replies that carried content
    assert strategy.current.bytes_up == sum(nbytes(a) for a in client_arrays) + 3 * (8 + C * D * 4 + C * 4)


def test_every_reply_failing_raises() -> None:
    strategy = make_strategy(clients_per_round=3)
    theta = model_arrays(np.random.default_rng(7))
    strategy.configure_train(1, to_record(theta), ConfigRecord(), make_grid())
    cohort = strategy.current.cohort
    with pytest.raises(RuntimeError):
        strategy.aggregate_train(1, [error_reply(p) for p in cohort])
    assert sorted(strategy.current.failed) == cohort


def test_configure_evaluate_sends_nothing() -> None:
    strategy = make_strategy()
    theta = to_record(model_arrays(np.random.default_rng(8)))
    assert list(strategy.configure_evaluate(1, theta, ConfigRecord(), make_grid())) == []
    assert strategy.aggregate_evaluate(1, []) is None


# ---------------------------------------------------------------- the global model and broadcast


class RecordingServer(ServerMethod):
    """Records what the strategy hands its hooks; optionally replaces the averaging weights."""

    def __init__(self, weights: list[float] | None = None) -> None:
        super().__init__(resolve({"method": "fedavg"}), toy_model(), toy_data())
        self.weights = weights
        self.seen_by_broadcast: list[dict[str, np.ndarray]] = []
        self.weight_reports: list[ClientReport] = []
        self.absorbed: list[ClientReport] = []

    def broadcast(self, server_round: int, global_model: EncoderClassifier) -> dict[str, np.ndarray]:
        self.seen_by_broadcast.append({k: v.detach().numpy().copy() for k, v in global_model.state_dict().items()})
        return {}

    def aggregation_weights(self, server_round: int, reports: list[ClientReport]) -> list[float] | None:
        self.weight_reports = list(reports)
        return self.weights

    def absorb(self, server_round: int, reports: list[ClientReport]) -> None:
        self.absorbed = list(reports)


def test_configure_train_loads_the_sent_arrays_into_the_global_model_before_broadcast() -> None:
    rng = np.random.default_rng(9)
    model = toy_model()
    server = RecordingServer()
    strategy = make_strategy(method="fedavg", model=model, server_method=server)
    for server_round in (1, 2):
        theta = model_arrays(rng)
        strategy.configure_train(server_round, to_record(theta), ConfigRecord(), make_grid())
        seen = server.seen_by_broadcast[-1]
        assert seen.keys() == theta.keys()
        for key in theta:
            assert np.array_equal(seen[key], theta[key]), (server_round, key)
            assert np.array_equal(model.state_dict()[key].numpy(), theta[key])
    assert len(server.seen_by_broadcast) == 2


def test_aggregation_weights_of_the_server_method_replace_the_sample_counts() -> None:
    rng = np.random.default_rng(10)
    weights = [3.0, 0.0, 1.0]
    server = RecordingServer(weights)
    strategy = make_strategy(method="fedavg", clients_per_round=3, server_method=server)
    theta = model_arrays(rng)
    strategy.configure_train(1, to_record(theta), ConfigRecord(), make_grid())
    cohort = strategy.current.cohort
    client_arrays = [model_arrays(rng) for _ in cohort]
    sizes = [50, 7, 900]
    arrays, _ = strategy.aggregate_train(
        1, [reply(p, a, n, 1.0) for p, a, n in zip(cohort, client_arrays, sizes, strict=True)]
    )
    got = as_numpy(arrays)
    by_weights = weighted_average(client_arrays, weights)
    by_sizes = weighted_average(client_arrays, sizes)
    for key in by_weights:
        assert np.allclose(got[key], by_weights[key], atol=1e-5), key
        assert not np.allclose(got[key], by_sizes[key], atol=1e-3), key
    # the hooks see the clients' real sample counts, not the replaced weights
    for reports in (server.weight_reports, server.absorbed):
        assert [(r.partition_id, r.num_examples) for r in reports] == list(zip(cohort, sizes, strict=True))


# ---------------------------------------------------------------- server optimizers


def bn_model() -> EncoderClassifier:
    return EncoderClassifier(nn.BatchNorm1d(D), D, C)


def bn_arrays(rng: np.random.Generator, var_scale: float = 0.1) -> dict[str, np.ndarray]:
    """A ``bn_model()`` state dict: parameters, and BatchNorm statistics with small variances."""
    return {
        "encoder.weight": rng.normal(size=(D,)).astype(np.float32),
        "encoder.bias": rng.normal(size=(D,)).astype(np.float32),
        "encoder.running_mean": rng.normal(size=(D,)).astype(np.float32),
        "encoder.running_var": (var_scale * rng.uniform(0.5, 1.0, size=(D,))).astype(np.float32),
        "encoder.num_batches_tracked": np.array(int(rng.integers(1, 100)), dtype=np.int64),
        "classifier.weight": rng.normal(size=(C, D)).astype(np.float32),
        "classifier.bias": rng.normal(size=(C,)).astype(np.float32),
    }


BUFFERS = ("encoder.running_mean", "encoder.running_var", "encoder.num_batches_tracked")


@pytest.mark.parametrize(("server_opt", "server_lr"), [("fedavg", 0.7), ("fedavgm", 1.0), ("fedadam", 0.1)])
def test_batchnorm_statistics_are_the_plain_weighted_average_whatever_the_server_optimizer(
    server_opt: str, server_lr: float
) -> None:

    rng = np.random.default_rng(11)
    model = bn_model()
    assert set(model.state_dict()) == set(bn_arrays(rng))
    strategy = make_strategy(method="fedavg", clients_per_round=3, server_lr=server_lr, server_opt=server_opt,
                             model=model, server_method=ServerMethod(resolve({"method": "fedavg"}), model, toy_data()))
    # The global variances start at 1 and the clients' sit near 0.1: a momentum (or
    # Adam) step on them would overshoot below zero in round 2.
    current = bn_arrays(rng, var_scale=1.0)
    current["encoder.running_var"] = np.ones(D, dtype=np.float32)
    for server_round in (1, 2):
        strategy.configure_train(server_round, to_record(current), ConfigRecord(), make_grid())
        cohort = strategy.current.cohort
        client_arrays = [bn_arrays(rng) for _ in cohort]
        sizes = [5, 40, 12]
        arrays, _ = strategy.aggregate_train(
            server_round, [reply(p, a, n, 1.0) for p, a, n in zip(cohort, client_arrays, sizes, strict=True)]
        )
        got = as_numpy(arrays)
        average = weighted_average(client_arrays, sizes)
        for key in BUFFERS:
            assert np.allclose(got[key].astype(np.float64), average[key], rtol=1e-5, atol=1e-5), (server_round, key)
        assert np.all(got["encoder.running_var"] > 0)
        if server_round == 2:  # the parameters did get the optimizer's step, not the plain average
            assert not np.allclose(got["classifier.weight"], average["classifier.weight"], atol=1e-3)
        assert all(np.all(np.isfinite(v)) for v in got.values())
        model.load_state_dict(arrays.to_torch_state_dict())  # the next round's global model loads
        current = got


def run_rounds(strategy: FedLTStrategy, rng: np.random.Generator, theta: dict[str, np.ndarray], rounds: int):
    """Drive ``rounds`` rounds; returns [(client arrays, sizes, aggregated arrays)] per round."""
    history = []
    current = theta
    for server_round in range(1, rounds + 1):
        strategy.configure_train(server_round, to_record(current), ConfigRecord(), make_grid())
        cohort = strategy.current.cohort
        client_arrays = [model_arrays(rng) for _ in cohort]
        sizes = [int(n) for n in rng.integers(1, 100, size=len(cohort))]
        arrays, _ = strategy.aggregate_train(
            server_round, [reply(p, a, n, 1.0) for p, a, n in zip(cohort, client_arrays, sizes, strict=True)]
        )
        current = as_numpy(arrays)
        history.append((client_arrays, sizes, current))
    return history


def test_fedavgm_is_textbook_server_momentum_over_two_rounds() -> None:
    rng = np.random.default_rng(12)
    lr, beta = 0.5, 0.9
    strategy = make_strategy(method="fedavg", clients_per_round=3, server_lr=lr, server_opt="fedavgm",
                             server_momentum=beta)
    theta = model_arrays(rng)
    history = run_rounds(strategy, rng, theta, rounds=2)

    expected = {k: v.astype(np.float64) for k, v in theta.items()}
    velocity = {k: np.zeros_like(v) for k, v in expected.items()}
    for server_round, (client_arrays, sizes, got) in enumerate(history, start=1):
        average = weighted_average(client_arrays, sizes)
        for key in expected:
            velocity[key] = beta * velocity[key] + (expected[key] - average[key])
            expected[key] = expected[key] - lr * velocity[key]
            assert np.allclose(got[key], expected[key], rtol=1e-5, atol=1e-5), (server_round, key)
    # momentum mattered: round 2 is not the plain server-lr step
    client_arrays, sizes, got = history[1]
    plain = history[0][2]["classifier.weight"] + lr * (
        weighted_average(client_arrays, sizes)["classifier.weight"] - history[0][2]["classifier.weight"]
    )
    assert not np.allclose(got["classifier.weight"], plain, atol=1e-3)


def test_fedadam_is_textbook_adam_with_bias_correction_at_the_round_number() -> None:
    rng = np.random.default_rng(13)
    lr, beta1, beta2, eps = 0.1, 0.9, 0.999, 1e-8
    strategy = make_strategy(method="fedavg", clients_per_round=3, server_lr=lr, server_opt="fedadam")
    theta = model_arrays(rng)
    history = run_rounds(strategy, rng, theta, rounds=2)

    expected = {k: v.astype(np.float64) for k, v in theta.items()}
    m = {k: np.zeros_like(v) for k, v in expected.items()}
    v = {k: np.zeros_like(x) for k, x in expected.items()}
    for t, (client_arrays, sizes, got) in enumerate(history, start=1):
        average = weighted_average(client_arrays, sizes)
        for key in expected:
            delta = average[key] - expected[key]
            m[key] = beta1 * m[key] + (1 - beta1) * delta
            v[key] = beta2 * v[key] + (1 - beta2) * delta**2
            step = lr * np.sqrt(1 - beta2**t) / (1 - beta1**t)
            expected[key] = expected[key] + step * m[key] / (np.sqrt(v[key]) + eps)
            assert np.allclose(got[key], expected[key], rtol=1e-5, atol=1e-5), (t, key)


def test_server_optimizer_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="server-opt"):
        server_optimizer("fedyogi", 1.0, 0.9, 0.01)
