"""ReGL's generation phase: one query to every client before round 1, so generation never runs inside a round.

Each client generates its synthetic images (or finds them in its cache) and replies with its counts and
seconds only, which the ServerApp keeps in config.json and summary.json (``synthetic``). Rounds after it
are the method's usual rounds; a client that finds its cache missing there (a node that joined later)
generates lazily in its first training call.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from .synthetic import SyntheticSet

QUERY = "regl_generate"
RECORD = "regl"


def reply_content(synthetic: SyntheticSet) -> RecordDict:
    """What a client sends back: counts and seconds, never an image."""
    return RecordDict({RECORD: MetricRecord(synthetic.metrics())})


def generate_on_clients(grid: Grid, node_of_partition: dict[int, int], timeout: float) -> dict[str, list]:
    """Ask every client to generate; per-client results in partition order. A failed client stops the run."""
    partition_of_node = {node: part for part, node in node_of_partition.items()}
    messages = [Message(RecordDict(), dst_node_id=node, message_type=f"{MessageType.QUERY}.{QUERY}")
                for _, node in sorted(node_of_partition.items())]
    replies = sorted(grid.send_and_receive(messages, timeout=timeout),
                     key=lambda r: partition_of_node.get(r.metadata.src_node_id, -1))
    failed = [f"partition-id {partition_of_node.get(r.metadata.src_node_id, -1)}: {r.error.reason}"
              for r in replies if r.has_error()]
    if failed:
        raise RuntimeError("synthetic-data=regl: generation failed on " + "; ".join(failed))
    if len(replies) < len(messages):
        raise TimeoutError(f"synthetic-data=regl: only {len(replies)} of {len(messages)} clients finished "
                           f"generating within regl-generate-timeout={timeout:g} s")
    records = [r.content[RECORD] for r in replies]
    result = {
        "partition_ids": [partition_of_node[r.metadata.src_node_id] for r in replies],
        "num_real": [int(m["num-real"]) for m in records],
        "num_synthetic": [int(m["num-synthetic"]) for m in records],
        "generate_seconds": [float(m["generate-seconds"]) for m in records],
        "cached": [bool(m["cached"]) for m in records],
    }
    log(INFO, "[fedlt] regl: %d synthetic images over %d clients (%d read from the cache), %.1f s at most",
        sum(result["num_synthetic"]), len(records), sum(result["cached"]), max(result["generate_seconds"]))
    return result
