"""Both sides of the protocol in one process: the reference driver for tests and overhead measurements.

``drop`` names, per stage, the nodes that do not answer that stage's request (and so are not asked
again): a dropout can be placed before any stage, including during unmasking.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlt_app.secagg.client import SecAggClient
from fedlt_app.secagg.messages import STAGES
from fedlt_app.secagg.server import SecAggServer


def run_round(inputs: Mapping[int, np.ndarray], threshold: int, context: bytes = b"grid",
              drop: Mapping[str, set[int]] | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
    """(unmasked sum of the survivors' uint64 inputs, survivors) for one round over ``inputs``' nodes."""
    drop = dict(drop or {})
    unknown = set(drop) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; stages are {STAGES}")
    lengths = {v.shape for v in inputs.values()}
    if len(lengths) != 1:
        raise ValueError(f"inputs differ in shape: {lengths}")
    (length,), = lengths
    server = SecAggServer(sorted(inputs), threshold, context, length)
    clients = {node: SecAggClient(node) for node in inputs}

    def answer(stage: str, requests: Mapping[int, object], respond) -> dict[int, object]:
        return {n: respond(clients[n], req) for n, req in requests.items() if n not in drop.get(stage, set())}

    requests = server.receive_keys(answer("advertise-keys", server.setup(), SecAggClient.advertise_keys))
    requests = server.receive_shares(answer("share-keys", requests, SecAggClient.share_keys))
    masked = answer("masked-input", requests, lambda c, r: c.masked_input(r, inputs[c.node_id]))
    requests = server.receive_masked(masked)
    total = server.receive_unmask(answer("unmask", requests, SecAggClient.unmask))
    return total, server.survivors
