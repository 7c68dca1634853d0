"""The ClientApp side on Flower's Message API: the three query handlers and the masked train reply.

Between messages the client's round secrets live in ``context.state`` (a virtual client may run in
another worker process for each message), as the prefixed arrays of ``wire.snapshot_arrays``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Context, Message, RecordDict

from fedlt_app.secagg import wire
from fedlt_app.secagg.client import SecAggClient
from fedlt_app.secagg.flower_server import RECORD
from fedlt_app.secagg.update import fedavg_layout, pack_sums, pack_update, sums_layout

STATE = "secagg-client"
_ROUNDING_STREAM = 0x5EC  # keeps the rounding draws apart from training's, which share the client's seed


def _load(context: Context) -> SecAggClient:
    if STATE not in context.state:
        raise RuntimeError("secure aggregation: this node holds no round state (it missed the key round)")
    return SecAggClient.restore(wire.snapshot_from(wire.from_record(context.state[STATE])))


def _save(context: Context, client: SecAggClient) -> None:
    context.state[STATE] = wire.to_record(wire.snapshot_arrays(client.snapshot()))


def _reply(msg: Message, arrays: wire.Arrays) -> Message:
    return Message(RecordDict({RECORD: wire.to_record(arrays)}), reply_to=msg)


def _stage(msg: Message, context: Context, client: SecAggClient,
           step: Callable[[SecAggClient, wire.Arrays], wire.Arrays]) -> Message:
    arrays = step(client, wire.from_record(msg.content[RECORD]))
    _save(context, client)
    return _reply(msg, arrays)


def handle_keys(msg: Message, context: Context) -> Message:
    """secagg_keys: a fresh client for this round; its two public keys."""
    client = SecAggClient(msg.metadata.dst_node_id)
    return _stage(msg, context, client, lambda c, a: wire.keys_arrays(c.advertise_keys(wire.setup_from(a))))


def handle_shares(msg: Message, context: Context) -> Message:
    """secagg_shares: the sealed Shamir shares for every other node."""
    return _stage(msg, context, _load(context),
                  lambda c, a: wire.ciphertexts_arrays(c.share_keys(wire.share_keys_ins_from(a)).ciphertexts))


def handle_unmask(msg: Message, context: Context) -> Message:
    """secagg_unmask: the shares that remove the masks from the sum; then the round's secrets are dropped,
    so a second unmask request finds nothing to answer from."""
    reply = _stage(msg, context, _load(context),
                   lambda c, a: wire.unmask_res_arrays(c.unmask(wire.unmask_ins_from(a))))
    context.state.pop(STATE)
    return reply


def masked_train_reply(msg: Message, context: Context, local_arrays: Mapping[str, np.ndarray], num_examples: int,
                       mean_loss: float, rounding_seed: int,
                       summands: Mapping[str, np.ndarray] | None = None,
                       metrics: Mapping[str, float] | None = None) -> RecordDict:
    """The train reply's whole content under secure aggregation: one masked vector, nothing else.

    ``summands``: the method's terms (``ClientMethod.summands``) for the sums the train message names.
    ``metrics``: the train reply's metrics as the plain path would send them; only those the train message
    names travel, inside the vector (``update.pack_update``), the others are dropped. The deltas carry the
    weight the message names (n, or 1: ``ServerMethod.client_weighting``).
    """
    if RECORD not in msg.content:
        raise RuntimeError("secure-aggregation=secagg: the train message carries no secure-aggregation record; "
                           "refusing to send an unmasked update")
    client = _load(context)
    record = wire.from_record(msg.content[RECORD])
    # The reference is the model as this client loaded it (a server optimizer may send float64, the model
    # trains in float32): the server takes the same, so the decoded mean never depends on the sent dtype.
    global_arrays = {k: v.numpy().astype(np.asarray(local_arrays[k]).dtype, copy=False)
                     for k, v in msg.content["arrays"].items()}
    layout = fedavg_layout(global_arrays, wire.segments_from(record), wire.weighting_from(record))
    vector = pack_update(layout, global_arrays, local_arrays, num_examples, mean_loss,
                         np.random.default_rng([rounding_seed, _ROUNDING_STREAM]), summands, metrics)
    res = client.masked_input(wire.masked_input_ins_from(record), vector)
    _save(context, client)
    return RecordDict({RECORD: wire.to_record(wire.masked_arrays(res))})


def masked_sums_reply(msg: Message, context: Context, summands: Mapping[str, np.ndarray],
                      rounding_seed: int) -> RecordDict:
    """A statistics query's whole reply under secure aggregation: one masked vector of the method's
    ``statistics_summands`` (the sums the query names), nothing else; the server learns only their sum."""
    if RECORD not in msg.content:
        raise RuntimeError("secure-aggregation=secagg: the statistics query carries no secure-aggregation record; "
                           "refusing to send unmasked statistics")
    client = _load(context)
    record = wire.from_record(msg.content[RECORD])
    vector = pack_sums(sums_layout(wire.segments_from(record)), summands,
                       np.random.default_rng([rounding_seed, _ROUNDING_STREAM]))
    res = client.masked_input(wire.masked_input_ins_from(record), vector)
    _save(context, client)
    return RecordDict({RECORD: wire.to_record(wire.masked_arrays(res))})
