"""The ClientApp's own train handler under secure aggregation, in process (no Ray): FedNH's clients train for
real, once with secure-aggregation=secagg on the in-process grid and once plain; the server states agree within
the fixed-point bound, the masked replies carry one vector and nothing else, and the personalised accuracy
reaches the server only as the cohort's mean."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Message
from test_secagg_methods import model_arrays
from test_secagg_strategy import NODES, InProcessGrid

from fedlt_app import client_app
from fedlt_app.config import resolve
from fedlt_app.methods import get_method
from fedlt_app.secagg.fixedpoint import FixedPoint
from fedlt_app.secagg.flower_server import RECORD, SecureRounds
from fedlt_app.strategy import FedLTStrategy, masked_metrics, server_optimizer
from fedlt_app.task import federated_data, initial_model

STEP = 1 / FixedPoint().scale
RUN_CONFIG = {"method": "fednh", "samples-per-class": 20, "imbalance-ratio": 2.0, "device": "cpu",
              "precision": "fp32", "local-epochs": 1}


def _round(secure: bool) -> tuple[FedLTStrategy, dict, list[Message]]:
    run_config = {**RUN_CONFIG, "secure-aggregation": "secagg" if secure else "off"}
    cfg = resolve(run_config)
    data = federated_data(cfg, len(NODES))
    model = initial_model(cfg, data)
    spec = get_method(cfg.method)
    strategy = FedLTStrategy(server_optimizer("fedavg", 1.0, 0.0, 0.01), spec.server(cfg, model, data), model, NODES,
                             0, 0, secure=SecureRounds(3, 10.0, masked_metrics(spec.client)) if secure else None)
    grid = InProcessGrid()
    for partition, node in NODES.items():
        grid.contexts[node].run_config = dict(run_config)
        grid.contexts[node].node_config = {"partition-id": partition, "num-partitions": len(NODES)}
    messages = list(strategy.configure_train(1, model_arrays(strategy), ConfigRecord(), grid))
    replies = [client_app.train(m, grid.contexts[m.metadata.dst_node_id]) for m in messages]
    contents = [r.content for r in replies]
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, {k: v.numpy() for k, v in arrays.items()}, contents


def test_fednh_clients_under_secagg_give_the_plain_round(task_identity) -> None:
    plain, plain_arrays, plain_contents = _round(secure=False)
    secure, secure_arrays, secure_contents = _round(secure=True)
    assert all(set(c) == {RECORD} and set(c[RECORD]) == {"masked"} for c in secure_contents)  # nothing else left
    assert all("personalised-accuracy" in c["metrics"] for c in plain_contents)
    for key, value in plain_arrays.items():
        np.testing.assert_allclose(secure_arrays[key], value, rtol=0, atol=STEP + 2e-7)
    np.testing.assert_allclose(secure.server_method.prototypes, plain.server_method.prototypes, rtol=0,
                               atol=STEP + 6e-8)
    assert secure.server_method.updated_classes == plain.server_method.updated_classes
    p, s = plain.current.personalised_metrics(), secure.current.personalised_metrics()
    assert len(p["personalised_accuracy_per_client"]) == len(NODES) and set(s) == {"personalised_accuracy"}
    assert abs(s["personalised_accuracy"] - p["personalised_accuracy"]) < STEP
    assert abs(secure.current.train_loss - plain.current.train_loss) < STEP
