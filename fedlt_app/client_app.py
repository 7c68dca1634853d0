"""fedlt ClientApp: local training of whichever method the run config names."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlt_app.active import client as active_learning
from fedlt_app.active import protocol as al_protocol
from fedlt_app.client_state import StateFiles, load_client_state, save_client_state
from fedlt_app.config import RunConfig, parse_class_list, resolve
from fedlt_app.data import FederatedData
from fedlt_app.generative import phase as regl_phase
from fedlt_app.generative.synthetic import synthetic_data, with_synthetic
from fedlt_app.methods import get_method
from fedlt_app.models import EncoderClassifier
from fedlt_app.personalised import label_distribution, personalised_accuracy
from fedlt_app.precision import precision_for
from fedlt_app.records import payload_to_record, record_to_payload
from fedlt_app.secagg import flower_client as secure
from fedlt_app.secagg.flower_server import QUERY_KEYS, QUERY_SHARES, QUERY_UNMASK
from fedlt_app.strategy import METHOD_KEY, STATISTICS_QUERY
from fedlt_app.task import client_dataset, client_seed, method_model, node_partition, resolve_device, statistics_seed
from fedlt_app.train import LocalTraining, train_locally

app = ClientApp()

# One model object per worker process, reused by every virtual client it
# serves: only its weights change between messages (CLIP methods: only the
# travelling state; the frozen CLIP is loaded once per process).
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


def report_personalised_accuracy(metrics: MetricRecord, personal: EncoderClassifier, data: FederatedData,
                                 labels: torch.Tensor, cfg: RunConfig, device: torch.device) -> None:
    """Add ``personalised-accuracy``: ``personal`` on the test split re-weighted to this client's labels.

    A node without a test split (a deployment node with its own local data) reports none.
    """
    test_images, test_labels = data.test_data()
    if len(test_labels):
        metrics["personalised-accuracy"] = personalised_accuracy(
            personal, test_images, test_labels, label_distribution(labels, data.num_classes), cfg.dataset,
            precision_for(cfg.precision, device))


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
    real_labels = labels  # the client's own (personalised accuracy, regl-weight-count=real)
    device = resolve_device(cfg.device)
    images, labels, synthetic = with_synthetic(cfg, data, images, labels, partition_id, device)  # ReGL: + generated
    model = _model(cfg, data, device)
    model.load_travelling_state(msg.content["arrays"].to_torch_state_dict())

    server_round = int(msg.content["config"]["server-round"])
    # this round's learning rate (lr-decay), for the optimizer and for every method step that uses it
    cfg = replace(cfg, local_lr=cfg.local_lr_at(server_round))
    inject_faults(cfg, partition_id)
    seed = client_seed(cfg.seed, server_round, partition_id)
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)  # shuffling, augmentation, balanced draws
    state_files = StateFiles.from_config(msg.content["config"], partition_id, cfg.checkpoint_every)  # resume
    method = get_method(cfg.method).client(cfg, data.num_classes, record_to_payload(msg.content.get(METHOD_KEY)),
                                           state=load_client_state(context.state, state_files))
    started = time.perf_counter()
    stats = train_locally(model, images, labels, method, LocalTraining.from_config(cfg), generator)
    method.finish(model)  # work on the trained model for the reply (RUCR's classifier re-training)
    train_seconds = time.perf_counter() - started
    weight = len(real_labels) if synthetic is not None and cfg.regl_weight_count == "real" else stats.num_examples
    save_client_state(context.state, method.state_to_keep(model), state_files)  # only after training succeeded

    metrics = MetricRecord({"num-examples": weight, "train-loss": stats.mean_loss, "train-seconds": train_seconds})
    if synthetic is not None:
        metrics["num-synthetic"] = len(synthetic.labels)
    if cfg.secure_aggregation == "secagg":  # one masked vector leaves, nothing else (README "Secure aggregation")
        summands = method.summands()  # what its server needs summed (RedGrape: per-class prototypes, holders)
        if method.report() and not summands:
            raise RuntimeError(f"secure-aggregation=secagg: method {cfg.method!r} reports per-client arrays")
        local = {k: v.detach().cpu().numpy().copy() for k, v in model.travelling_state().items()}
    else:
        content = RecordDict({"arrays": ArrayRecord(model.travelling_state()), "metrics": metrics})
        report = method.report()
        if report:
            content[METHOD_KEY] = payload_to_record(report)
    personal = method.personalised_model(model)  # after the reply's model was taken: a tuned copy never leaves
    if personal is not None:  # FedETF, FedNH, FedLoGe: one number beside the global metrics
        report_personalised_accuracy(metrics, personal, data, real_labels, cfg, device)
    if cfg.secure_aggregation == "secagg":  # the metrics the server names travel masked (their cohort mean)
        return Message(secure.masked_train_reply(msg, context, local, weight, stats.mean_loss, seed, summands,
                                                 dict(metrics)), reply_to=msg)
    return Message(content=content, reply_to=msg)


# Secure aggregation (secure-aggregation=secagg): the protocol's query rounds; see fedlt_app/secagg/.
@app.query(QUERY_KEYS)
def secagg_keys(msg: Message, context: Context) -> Message:
    return secure.handle_keys(msg, context)


@app.query(QUERY_SHARES)
def secagg_shares(msg: Message, context: Context) -> Message:
    return secure.handle_shares(msg, context)


@app.query(QUERY_UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    return secure.handle_unmask(msg, context)


@app.query(STATISTICS_QUERY)
def method_statistics(msg: Message, context: Context) -> Message:
    """The method's statistics of the server's global model on this node's data (CCVR's feature moments)."""
    cfg = resolve(context.run_config)
    data, images, labels = client_dataset(cfg, context.node_config)
    device = resolve_device(cfg.device)
    images, labels, _ = with_synthetic(cfg, data, images, labels, node_partition(context.node_config)[0], device)
    model = _model(cfg, data, device)
    model.load_travelling_state(msg.content["arrays"].to_torch_state_dict())
    method = get_method(cfg.method).client(cfg, data.num_classes, record_to_payload(msg.content.get(METHOD_KEY)))
    server_round = int(msg.content["config"]["server-round"])
    seed = statistics_seed(cfg.seed, server_round, node_partition(context.node_config)[0])
    precision = precision_for(cfg.precision, device)
    generator = torch.Generator().manual_seed(seed)
    if cfg.secure_aggregation == "secagg":  # one masked vector of the method's summands leaves, nothing else
        summands = method.statistics_summands(model, images, labels, precision, generator)
        return Message(secure.masked_sums_reply(msg, context, summands, seed), reply_to=msg)
    payload = method.statistics(model, images, labels, precision, generator)
    return Message(RecordDict({METHOD_KEY: payload_to_record(payload)}), reply_to=msg)


@app.query(regl_phase.QUERY)
def regl_generate(msg: Message, context: Context) -> Message:
    """ReGL's generation phase (synthetic-data=regl): generate or find this client's images; counts go back."""
    cfg = resolve(context.run_config)
    data, images, labels = client_dataset(cfg, context.node_config)
    synthetic = synthetic_data(cfg, data, images, labels, node_partition(context.node_config)[0],
                               resolve_device(cfg.device))
    return Message(regl_phase.reply_content(synthetic), reply_to=msg)


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
