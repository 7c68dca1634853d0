"""The client side of active learning: Flower handlers around :mod:`fedlt_app.active.query`.

A client's labeled positions (into its own partition) live in
``context.state``, so they persist across messages in simulation and in
deployment; its unlabeled pool is the rest of the partition. Every handler
builds a :class:`ClientPool`, which exposes labels of the labeled set only,
and replies with scalars.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlt_app.active import protocol
from fedlt_app.active.local_only import LocalOnlySetup, train_local_only
from fedlt_app.active.pool import ClientPool
from fedlt_app.active.query import (
    FairFALSettings,
    entropy_query,
    fairfal_query,
    fairfal_statistics,
    random_query,
)
from fedlt_app.config import RunConfig, resolve
from fedlt_app.data import FederatedData
from fedlt_app.models import EncoderClassifier
from fedlt_app.task import client_dataset, method_model, node_partition, resolve_device

# One network per role and worker process; only the weights change between messages.
_MODELS: dict[tuple, EncoderClassifier] = {}


def _network(role: str, cfg: RunConfig, data: FederatedData, arrays: Mapping[str, torch.Tensor]) -> EncoderClassifier:
    device = resolve_device(cfg.device)
    key = (role, cfg.method, cfg.model, cfg.dataset, data.num_classes, str(device))
    if key not in _MODELS:
        _MODELS[key] = method_model(cfg, data).to(device)
    model = _MODELS[key]
    model.load_state_dict(arrays)
    return model.eval()


def labeled_positions(state: RecordDict) -> np.ndarray:
    if protocol.LABELED_STATE not in state:
        raise RuntimeError("this client has no labeled set yet: the server must send query.al_init first")
    return state[protocol.LABELED_STATE]["positions"].numpy()


def _store_positions(state: RecordDict, positions: np.ndarray) -> None:
    state[protocol.LABELED_STATE] = ArrayRecord({"positions": Array(np.asarray(positions, dtype=np.int64))})


def restrict_to_labeled(
    config: ConfigRecord, state: RecordDict, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's training data: its labeled set when the driver asks for it, else everything."""
    if not config.get(protocol.TRAIN_ON_LABELED, False):
        return images, labels
    return ClientPool(images, labels, labeled_positions(state)).labeled_data()


def _pool(cfg: RunConfig, context: Context) -> tuple[FederatedData, ClientPool, int]:
    partition_id, _ = node_partition(context.node_config)
    data, images, labels = client_dataset(cfg, context.node_config)
    labeled = labeled_positions(context.state) if protocol.LABELED_STATE in context.state else []
    return data, ClientPool(images, labels, labeled), partition_id


def _labeled_reply(msg: Message, cfg: RunConfig, pool: ClientPool, revealed: torch.Tensor, num_classes: int,
                   extra: Mapping[str, Any]) -> Message:
    metrics: dict[str, Any] = {
        "num-labeled": int(pool.labeled.size),
        **extra,
        "selection-digest": protocol.selection_digest(pool.labeled),
    }
    if cfg.al_report_query_counts:
        metrics["queried-per-class"] = [int(n) for n in torch.bincount(revealed, minlength=num_classes)]
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def handle_init(msg: Message, context: Context) -> Message:
    """Label ``initial`` samples drawn uniformly at random from the partition."""
    cfg = resolve(context.run_config)
    data, pool, partition_id = _pool(cfg, context)
    initial = int(msg.content["config"]["initial"])
    rng = np.random.default_rng(protocol.stream_seed(cfg.seed, "init", partition_id))
    pool.labeled = np.empty(0, dtype=np.int64)  # a new run starts from nothing
    revealed = pool.reveal(rng.choice(len(pool), size=initial, replace=False))
    _store_positions(context.state, pool.labeled)
    return _labeled_reply(msg, cfg, pool, revealed, data.num_classes, {})


def _local_only_setup(cfg: RunConfig) -> LocalOnlySetup:
    return LocalOnlySetup(
        epochs=cfg.fairfal_local_epochs,
        milestone=cfg.fairfal_local_milestone,
        milestone_unit=cfg.fairfal_local_milestone_unit,
        early_stop=cfg.fairfal_local_early_stop,
        batch_size=cfg.batch_size,
        lr=cfg.local_lr,
        momentum=cfg.momentum,
        dataset=cfg.dataset,
        augment=cfg.augment,
    )


def handle_stats(msg: Message, context: Context) -> Message:
    """FairFAL pass 1: train the local-only model, reply (r_k, d_k); keep the model and d_k."""
    cfg = resolve(context.run_config)
    data, pool, partition_id = _pool(cfg, context)
    cycle = int(msg.content["config"]["cycle"])
    global_model = _network("global", cfg, data, msg.content["arrays"].to_torch_state_dict())
    local_model = _network("local", cfg, data, protocol.local_only_initial_model(cfg, data, cycle).state_dict())
    generator = torch.Generator().manual_seed(protocol.stream_seed(cfg.seed, "local-only", cycle, partition_id))
    images, labels = pool.labeled_data()
    torch.manual_seed(generator.initial_seed())  # dropout, as the train handler seeds it
    train_local_only(local_model, images, labels, _local_only_setup(cfg), generator)
    r, d = fairfal_statistics(pool, global_model, local_model, cfg.dataset)
    context.state[protocol.LOCAL_MODEL_STATE] = ArrayRecord(local_model.state_dict())
    context.state[protocol.STATS_STATE] = MetricRecord({"d": d, "cycle": cycle})
    return Message(RecordDict({"metrics": MetricRecord({"r": r, "d": d})}), reply_to=msg)


def _fairfal_settings(cfg: RunConfig) -> FairFALSettings:
    return FairFALSettings(
        t=cfg.fairfal_t,
        global_threshold=cfg.fairfal_global_threshold,
        gradient_threshold=cfg.fairfal_gradnet_threshold,
        oversample=cfg.fairfal_oversample,
        temperature=cfg.fairfal_proto_temperature,
        distance=cfg.fairfal_distance,
    )


def handle_select(msg: Message, context: Context) -> Message:
    """Pass 2: choose ``budget`` unlabeled samples, label them, reply the new size."""
    cfg = resolve(context.run_config)
    data, pool, partition_id = _pool(cfg, context)
    config = msg.content["config"]
    cycle, budget = int(config["cycle"]), int(config["budget"])
    before = pool.labeled.size
    if cfg.al_method == "random":
        rng = np.random.default_rng(protocol.stream_seed(cfg.seed, "random", cycle, partition_id))
        picks = random_query(pool, budget, rng)
    else:
        global_model = _network("global", cfg, data, msg.content["arrays"].to_torch_state_dict())
        if cfg.al_method == "entropy":
            picks = entropy_query(pool, global_model, budget, cfg.dataset)
        else:
            stats = context.state.get(protocol.STATS_STATE)
            if stats is None or int(stats["cycle"]) != cycle:
                raise RuntimeError(f"query.al_select for cycle {cycle} came before this cycle's query.fairfal_stats")
            local = _network("local", cfg, data, context.state[protocol.LOCAL_MODEL_STATE].to_torch_state_dict())
            picks = fairfal_query(pool, global_model, local, float(stats["d"]), float(config["r-bar"]), budget,
                                  _fairfal_settings(cfg), cfg.dataset)
            del context.state[protocol.LOCAL_MODEL_STATE]  # one query's model; no need to keep it
    if len(picks) != budget:
        raise RuntimeError(f"partition {partition_id}: the query found {len(picks)} of {budget} samples to label")
    revealed = pool.reveal(picks)
    _store_positions(context.state, pool.labeled)
    return _labeled_reply(msg, cfg, pool, revealed, data.num_classes,
                          {"num-queried": int(pool.labeled.size - before)})
