"""fedlt ClientApp: local training of whichever method the run config names."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlt_app.active import client as active_learning
from fedlt_app.active import protocol as al_protocol
from fedlt_app.config import RunConfig, parse_class_list, resolve
from fedlt_app.data import FederatedData
from fedlt_app.methods import get_method
from fedlt_app.models import EncoderClassifier
from fedlt_app.records import payload_to_record, record_to_payload
from fedlt_app.strategy import METHOD_KEY
from fedlt_app.task import client_dataset, client_seed, method_model, node_partition, resolve_device
from fedlt_app.train import LocalTraining, train_locally

app = ClientApp()

# One model object per worker process, reused by every virtual client it
# serves: only its weights change between messages.
_MODELS: dict[tuple, EncoderClassifier] = {}


def _model(cfg: RunConfig, data: FederatedData, device: torch.device) -> EncoderClassifier:
    key = (cfg.method, cfg.model, cfg.dataset, data.num_classes, str(device))
    if key not in _MODELS:
        _MODELS[key] = method_model(cfg, data).to(device)
    return _MODELS[key]


def inject_faults(cfg: RunConfig, partition_id: int) -> None:
    """Testing aid: make chosen clients raise or stall (debug-*-partitions)."""
    if cfg.debug_fail_partitions and partition_id in parse_class_list(cfg.debug_fail_partitions):
        raise RuntimeError(f"fault injection: partition-id {partition_id} fails (debug-fail-partitions)")
    if cfg.debug_hang_partitions and partition_id in parse_class_list(cfg.debug_hang_partitions):
        time.sleep(cfg.round_timeout + 5)


@app.query("partition")
def report_partition(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (for seeded cohorts)."""
    partition_id, num_partitions = node_partition(context.node_config)
    record = MetricRecord({"partition-id": partition_id, "num-partitions": num_partitions})
    return Message(RecordDict({"partition": record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = resolve(context.run_config)
    partition_id, _ = node_partition(context.node_config)
    data, images, labels = client_dataset(cfg, context.node_config)
    images, labels = active_learning.restrict_to_labeled(msg.content["config"], context.state, images, labels)
    device = resolve_device(cfg.device)
    model = _model(cfg, data, device)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())

    server_round = int(msg.content["config"]["server-round"])
    inject_faults(cfg, partition_id)
    seed = client_seed(cfg.seed, server_round, partition_id)
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)  # shuffling, augmentation, balanced draws
    method = get_method(cfg.method).client(cfg, data.num_classes, record_to_payload(msg.content.get(METHOD_KEY)))
    started = time.perf_counter()
    stats = train_locally(model, images, labels, method, LocalTraining.from_config(cfg), generator)
    train_seconds = time.perf_counter() - started

    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": stats.num_examples, "train-loss": stats.mean_loss,
                                     "train-seconds": train_seconds}),
        }
    )
    report = method.report()
    if report:
        content[METHOD_KEY] = payload_to_record(report)
    return Message(content=content, reply_to=msg)


# Active learning (al-method): the query passes; see fedlt_app/active/client.py.
@app.query(al_protocol.INIT)
def al_init(msg: Message, context: Context) -> Message:
    return active_learning.handle_init(msg, context)


@app.query(al_protocol.STATS)
def fairfal_stats(msg: Message, context: Context) -> Message:
    return active_learning.handle_stats(msg, context)


@app.query(al_protocol.SELECT)
def al_select(msg: Message, context: Context) -> Message:
    return active_learning.handle_select(msg, context)
