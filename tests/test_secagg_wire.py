"""Secure aggregation over Flower records: every message and the client's state between messages
go through ArrayRecords, as on the Message API; the FedAvg vector decodes to the weighted mean."""

from __future__ import annotations

import numpy as np

from fedlt_app.secagg import wire
from fedlt_app.secagg.client import SecAggClient
from fedlt_app.secagg.server import SecAggServer
from fedlt_app.secagg.update import fedavg_layout, pack_update, unpack_average

NODES = [2**63 + 5, 17, 2**64 - 1, 40_000, 3]  # Flower node ids are unsigned 64-bit


def _through_records(arrays: wire.Arrays) -> wire.Arrays:
    return wire.from_record(wire.to_record(arrays))


def test_a_round_through_records_with_state_restored_each_message_gives_the_weighted_mean():
    rng = np.random.default_rng(0)
    global_arrays = {"w": rng.normal(0, 1, (3, 4)).astype(np.float32), "b": np.zeros(3, np.float32),
                     "bn.num_batches_tracked": np.array(10, dtype=np.int64)}
    local = {n: {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v + 3
                 for k, v in global_arrays.items()} for n in NODES}
    count = {n: int(rng.integers(10, 100)) for n in NODES}
    loss = {n: float(rng.uniform(0, 2)) for n in NODES}
    layout = fedavg_layout(global_arrays)
    server = SecAggServer(NODES, 4, b"round-7", layout.length)
    state = {}  # node -> its context.state entry

    def step(node, fn, request):
        client = SecAggClient.restore(wire.snapshot_from(_through_records(state[node]))) if node in state \
            else SecAggClient(node)
        reply = fn(client, request)
        state[node] = wire.snapshot_arrays(client.snapshot())
        return reply

    keys = {n: wire.keys_from(_through_records(wire.keys_arrays(step(
        n, lambda c, r: c.advertise_keys(wire.setup_from(_through_records(wire.setup_arrays(r)))), s))))
        for n, s in server.setup().items()}
    reqs = server.receive_keys(keys)
    shares = {n: wire.share_keys_res_from(_through_records(wire.ciphertexts_arrays(step(
        n, lambda c, r: c.share_keys(wire.share_keys_ins_from(_through_records(wire.share_keys_ins_arrays(r)))),
        req).ciphertexts))) for n, req in reqs.items()}
    reqs = server.receive_shares(shares)
    survivors = [n for n in reqs if n != 17]  # 17 drops after sharing: its pairwise masks are recovered
    masked = {}
    for n in survivors:
        vector = pack_update(layout, global_arrays, local[n], count[n], loss[n], np.random.default_rng(n % 1000))
        res = step(n, lambda c, r, v=vector: c.masked_input(
            wire.masked_input_ins_from(_through_records(wire.ciphertexts_arrays(r.ciphertexts))), v), reqs[n])
        masked[n] = wire.masked_from(_through_records(wire.masked_arrays(res)))
    reqs = server.receive_masked(masked)
    answers = {n: wire.unmask_res_from(_through_records(wire.unmask_res_arrays(step(
        n, lambda c, r: c.unmask(wire.unmask_ins_from(_through_records(wire.unmask_ins_arrays(r)))), req))))
        for n, req in reqs.items()}
    arrays, n_total, mean_loss, clipped = unpack_average(layout, global_arrays, server.receive_unmask(answers))
    assert n_total == sum(count[n] for n in survivors) and clipped == 0
    bound = layout.codec.sum_error_bound(len(survivors)) / n_total
    for k in ("w", "b"):
        plain = sum(count[n] * local[n][k].astype(np.float64) for n in survivors) / n_total
        assert arrays[k].dtype == np.float32
        assert np.abs(arrays[k] - plain).max() < bound + 1e-6  # + float32 storage
    assert arrays["bn.num_batches_tracked"] == 13
    assert abs(mean_loss - sum(count[n] * loss[n] for n in survivors) / n_total) < bound
