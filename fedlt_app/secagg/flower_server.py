"""The ServerApp side on Flower's Message API: query rounds around the train round, then the unmasking.

Per round: ``secagg_keys`` and ``secagg_shares`` queries to the cohort (before training), the train
messages carry each client's routed ciphertexts, the clients' train replies carry only masked vectors,
and a ``secagg_unmask`` query to the survivors yields the sum.  The strategy then sees one synthetic
reply with the weighted-mean arrays and the cohort's total example count, so every server optimizer,
BatchNorm averaging and checkpointing work as without secure aggregation, and the method's sums
(``ServerMethod.sum_segments``, e.g. RedGrape's per-class prototype sums and holder counts) beside it.
The synthetic reply's metrics also hold the cohort means of the masked metrics (``SecureRounds.metrics``:
the personalised accuracy), never a client's own value. A method whose statistics query can be answered by
sums (CCVR) runs a second instance after aggregation (``prepare_sums`` / ``aggregate_sums``): its own keys,
shares and masks over a sums-only vector.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedlt_app.records import content_nbytes
from fedlt_app.secagg import wire
from fedlt_app.secagg.errors import BelowThreshold
from fedlt_app.secagg.layout import Layout
from fedlt_app.secagg.messages import default_threshold
from fedlt_app.secagg.server import SecAggServer
from fedlt_app.secagg.update import (
    fedavg_layout,
    method_segments,
    metric_segments,
    sums_layout,
    unpack_average,
    unpack_method_sums,
    unpack_metric_means,
    unpack_sums,
)

if TYPE_CHECKING:
    from fedlt_app.methods.base import SumSpec

RECORD = "secagg"
QUERY_KEYS, QUERY_SHARES, QUERY_UNMASK = "secagg_keys", "secagg_shares", "secagg_unmask"


@dataclass
class _Round:
    server_round: int
    server: SecAggServer
    layout: Layout
    global_arrays: dict[str, np.ndarray] | None  # the train round's reference model; None: a statistics query
    grid: Grid


def masked_values(replies: list[Message]) -> int:
    """How many values the masked train replies carry: under secagg this is what travels up in place of the
    model (every value of the vector, BatchNorm statistics, counters and method sums included)."""
    return sum(int(r.content[RECORD]["masked"].numpy().size) for r in replies)


class SecureRounds:
    """Secure aggregation for every round of a run; counts the protocol's bytes each way."""

    def __init__(self, min_cohort: int, timeout: float, metrics: tuple[str, ...] = ()) -> None:
        """``metrics``: train-reply metrics that travel inside the masked sum (the server learns their cohort
        mean: ``personalised-accuracy`` of a method with personalised models); every other per-client metric
        is dropped."""
        self.min_cohort = min_cohort
        self.timeout = timeout
        self.metrics = tuple(metrics)
        self.bytes_down = 0
        self.bytes_up = 0
        self.clipped = 0
        self._round: _Round | None = None

    def prepare(self, grid: Grid, server_round: int, train_messages: list[Message],
                global_arrays: ArrayRecord, method_sums: Mapping[str, SumSpec] | None = None,
                weighting: str = "examples") -> list[Message]:
        """Runs the key and share rounds; returns the train messages of U2 with their ciphertexts added.

        ``global_arrays``: the model the clients start from, in the dtypes they train it in (the deltas'
        reference, and the dtypes of the decoded mean).
        ``method_sums``: what the method's server needs summed besides the model (its ``sum_segments``);
        each train message names these segments, and the clients append them to their vectors.
        ``weighting``: the method's ``client_weighting`` (n or 1 per client), named in the train messages.
        """
        arrays = {k: v.numpy() for k, v in global_arrays.items()}
        extra = method_segments(method_sums or {}) + metric_segments(self.metrics)
        layout = fedavg_layout(arrays, extra, weighting)
        return self._open(grid, server_round, train_messages, layout, arrays, b"train",
                          {**wire.segments_arrays(extra), **wire.weighting_arrays(weighting)})

    def prepare_sums(self, grid: Grid, server_round: int, messages: list[Message],
                     sums: Mapping[str, SumSpec]) -> list[Message]:
        """The key and share rounds of a second protocol instance in the round, for a statistics query whose
        answers the server may see only summed (``ServerMethod.statistics_sum_segments``: CCVR's per-class
        feature sums); returns the query messages of U2, each naming the sums and carrying its ciphertexts.
        The train round's instance has ended (its unmasking) by then; this one has its own keys and masks."""
        extra = method_segments(sums)
        return self._open(grid, server_round, messages, sums_layout(extra), None, b"statistics",
                          wire.segments_arrays(extra))

    def _open(self, grid: Grid, server_round: int, messages: list[Message], layout: Layout,
              global_arrays: dict[str, np.ndarray] | None, tag: bytes, named: wire.Arrays) -> list[Message]:
        """Keys and shares among the messages' nodes for vectors of ``layout``; the messages of the nodes that
        got through, each given its own content with its routed ciphertexts and ``named`` (the layout's
        public description)."""
        self.bytes_down = self.bytes_up = 0
        nodes = [m.metadata.dst_node_id for m in messages]
        threshold = max(default_threshold(len(nodes)), self.min_cohort)
        if threshold > len(nodes):
            raise BelowThreshold(f"the cohort has {len(nodes)} clients, fewer than "
                                 f"secagg-min-cohort={self.min_cohort}")
        context = b"fedlt-secagg|round=%d|%s|" % (server_round, tag) + os.urandom(16)
        server = SecAggServer(nodes, threshold, context, layout.length)
        self._round = _Round(server_round, server, layout, global_arrays, grid)
        answers = self._ask(QUERY_KEYS, {n: wire.setup_arrays(m) for n, m in server.setup().items()})
        requests = server.receive_keys({n: wire.keys_from(a) for n, a in answers.items()})
        answers = self._ask(QUERY_SHARES, {n: wire.share_keys_ins_arrays(m) for n, m in requests.items()})
        routed = server.receive_shares({n: wire.share_keys_res_from(a) for n, a in answers.items()})
        kept = [m for m in messages if m.metadata.dst_node_id in routed]
        for m in kept:  # Flower's FedAvg gives every message one shared RecordDict: each needs its own
            content = RecordDict(dict(m.content.items()))
            content[RECORD] = wire.to_record({**wire.ciphertexts_arrays(routed[m.metadata.dst_node_id].ciphertexts),
                                              **named})
            m.content = content
        return kept

    def aggregate(self, replies: list[Message]) -> tuple[Message, dict[str, np.ndarray]]:
        """The masked replies -> (one reply holding the weighted-mean arrays, n, the mean loss and the masked
        metrics' cohort means; the method's sums by name, float64 real / int64 exact)."""
        assert self._round is not None and self._round.global_arrays is not None, "prepare() runs first"
        r = self._round
        total = self._unmask(replies)
        arrays, n, loss, self.clipped = unpack_average(r.layout, r.global_arrays, total)
        if self.clipped:
            log(WARNING, "[fedlt] secure aggregation round %d: %d coordinates clipped to +-%g",
                r.server_round, self.clipped, r.layout.codec.clip)
        synthetic = replies[0]
        synthetic.content = RecordDict({
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n, "train-loss": loss,
                                     **unpack_metric_means(r.layout, total)})})
        self._round = None
        return synthetic, unpack_method_sums(r.layout, total)

    def aggregate_sums(self, replies: list[Message]) -> dict[str, np.ndarray]:
        """The masked statistics replies -> the method's sums by name (float64 real, int64 exact)."""
        assert self._round is not None and self._round.global_arrays is None, "prepare_sums() runs first"
        r = self._round
        sums, self.clipped = unpack_sums(r.layout, self._unmask(replies))
        if self.clipped:
            log(WARNING, "[fedlt] secure statistics round %d: %d coordinates clipped to +-%g",
                r.server_round, self.clipped, r.layout.codec.clip)
        self._round = None
        return sums

    def _unmask(self, replies: list[Message]) -> np.ndarray:
        """The unmasking stage: the survivors' masked vectors in, their sum out."""
        assert self._round is not None
        r = self._round
        masked = {m.metadata.src_node_id: wire.masked_from(wire.from_record(m.content[RECORD])) for m in replies}
        requests = r.server.receive_masked(masked)
        answers = self._ask(QUERY_UNMASK, {n: wire.unmask_ins_arrays(m) for n, m in requests.items()})
        return r.server.receive_unmask({n: wire.unmask_res_from(a) for n, a in answers.items()})

    def _ask(self, query: str, arrays_by_node: dict[int, wire.Arrays]) -> dict[int, wire.Arrays]:
        """One query round; a node that fails or does not answer is left out (a dropout)."""
        assert self._round is not None
        r = self._round
        messages = [Message(RecordDict({RECORD: wire.to_record(a),
                                        "config": ConfigRecord({"server-round": r.server_round})}),
                            dst_node_id=node, message_type=f"{MessageType.QUERY}.{query}")
                    for node, a in arrays_by_node.items()]
        self.bytes_down += sum(content_nbytes(m.content) for m in messages)
        answers = {}
        for reply in r.grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "[fedlt] secure aggregation round %d: node %d failed %s: %s",
                    r.server_round, node, query, reply.error.reason)
                continue
            self.bytes_up += content_nbytes(reply.content)
            answers[node] = wire.from_record(reply.content[RECORD])
        for node in set(arrays_by_node) - set(answers):
            log(WARNING, "[fedlt] secure aggregation round %d: node %d dropped at %s", r.server_round, node, query)
        return answers

