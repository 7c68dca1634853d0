"""Find the federation's clients: which node holds which partition.

Shared by the ServerApp's federated training and its active-learning loop
(:mod:`fedlt_app.active.driver`), so both sit above it.
"""

from __future__ import annotations

import time

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

DISCOVERY_TIMEOUT = 300.0


def discover_clients(grid: Grid, timeout: float = DISCOVERY_TIMEOUT) -> dict[int, int]:
    """Map partition id -> node id for every client of the federation.

    Node ids are random per run, so seeded cohorts are drawn over partition
    ids instead. Waits until as many nodes as ``num-partitions`` have joined.
    """
    node_of_partition: dict[int, int] = {}
    expected: int | None = None
    queried: set[int] = set()
    deadline = time.monotonic() + timeout
    while expected is None or len(node_of_partition) < expected:
        new_nodes = [n for n in grid.get_node_ids() if n not in queried]
        if new_nodes:
            messages = [
                Message(RecordDict(), dst_node_id=node, message_type=f"{MessageType.QUERY}.partition")
                for node in new_nodes
            ]
            for reply in grid.send_and_receive(messages, timeout=timeout):
                if reply.has_error():
                    raise RuntimeError(f"node {reply.metadata.src_node_id} failed to report its partition: "
                                       f"{reply.error.reason}")
                record = reply.content["partition"]
                partition_id, total = int(record["partition-id"]), int(record["num-partitions"])
                if partition_id in node_of_partition:
                    raise ValueError(f"partition-id {partition_id} is held by two nodes; give each node its own")
                node_of_partition[partition_id] = reply.metadata.src_node_id
                expected = total if expected is None else expected
                if total != expected:
                    raise ValueError(f"num-partitions disagrees between nodes ({total} vs {expected})")
            queried.update(new_nodes)
        elif time.monotonic() > deadline:
            raise TimeoutError(f"only {len(node_of_partition)} of {expected or '?'} clients joined in {timeout:.0f} s")
        else:
            time.sleep(0.5)
    return node_of_partition
