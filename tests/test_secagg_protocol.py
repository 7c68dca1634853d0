"""The secure-aggregation protocol in process: masks cancel, dropouts recovered, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fedlt_app.secagg import aead
from fedlt_app.secagg.client import SecAggClient
from fedlt_app.secagg.errors import BelowThreshold, ProtocolViolation
from fedlt_app.secagg.grid import run_round
from fedlt_app.secagg.layout import Layout, Segment
from fedlt_app.secagg.messages import STAGES, MaskedInputIns, UnmaskIns, check_unmask_lists
from fedlt_app.secagg.server import SecAggServer

NODES = [11, 5, 902, 37, 64, 8, 1000]  # unsorted, sparse ids like Flower's


def _inputs(length: int = 257, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, 2**64 - 1, length, dtype=np.uint64, endpoint=True) for n in NODES}


def _plain_sum(inputs: dict[int, np.ndarray], nodes) -> np.ndarray:
    total = np.zeros(next(iter(inputs.values())).shape, np.uint64)
    for n in nodes:
        total += inputs[n]
    return total


@pytest.mark.parametrize("stage", STAGES)
def test_masks_cancel_exactly_with_a_dropout_at_each_stage(stage):
    inputs = _inputs()
    total, survivors = run_round(inputs, threshold=4, drop={stage: {37}})
    expected_survivors = set(NODES) - ({37} if stage != "unmask" else set())  # unmask dropouts still count
    assert set(survivors) == expected_survivors
    assert np.array_equal(total, _plain_sum(inputs, survivors))


def test_masks_cancel_with_dropouts_at_every_stage_at_once():
    inputs = _inputs()
    drop = {"advertise-keys": {5}, "share-keys": {902}, "masked-input": {64}}
    total, survivors = run_round(inputs, threshold=4, drop=drop)
    assert set(survivors) == {11, 37, 8, 1000}
    assert np.array_equal(total, _plain_sum(inputs, survivors))


@pytest.mark.parametrize("stage", STAGES)
def test_fewer_than_threshold_is_a_clear_error(stage):
    with pytest.raises(BelowThreshold, match=rf"stage '{stage}': 3 of 7 clients answered, threshold is 4"):
        run_round(_inputs(), threshold=4, drop={stage: {5, 902, 37, 64}})


def _to_masked_input(inputs, threshold=4, drop_share=()):
    """Runs the first two stages; returns the server, the clients and the masked-input requests."""
    server = SecAggServer(sorted(inputs), threshold, b"test", next(iter(inputs.values())).size)
    clients = {n: SecAggClient(n) for n in inputs}
    reqs = server.receive_keys({n: clients[n].advertise_keys(r) for n, r in server.setup().items()})
    reqs = server.receive_shares({n: clients[n].share_keys(r) for n, r in reqs.items() if n not in drop_share})
    return server, clients, reqs


def test_a_lone_masked_vector_hides_the_input_and_the_masked_sum_needs_unmasking():
    inputs = _inputs()
    server, clients, reqs = _to_masked_input(inputs)
    masked = {n: clients[n].masked_input(r, inputs[n]) for n, r in reqs.items()}
    assert all(np.count_nonzero(masked[n].vector == inputs[n]) == 0 for n in masked)
    unmask = server.receive_masked(masked)
    masked_sum = _plain_sum({n: m.vector for n, m in masked.items()}, masked)
    assert not np.array_equal(masked_sum, _plain_sum(inputs, NODES))  # self-masks still in
    total = server.receive_unmask({n: clients[n].unmask(r) for n, r in unmask.items()})
    assert np.array_equal(total, _plain_sum(inputs, NODES))


def test_both_shares_of_one_node_are_never_given():
    with pytest.raises(ProtocolViolation, match=r"both shares of node\(s\) \[37\]"):
        check_unmask_lists((11, 37), (37,))  # what the server runs before sending a request
    inputs = _inputs()
    server, clients, reqs = _to_masked_input(inputs)
    masked = {n: clients[n].masked_input(r, inputs[n]) for n, r in reqs.items() if n != 37}
    honest = server.receive_masked(masked)[11]
    assert honest.dropped == (37,) and 37 not in honest.survivors
    lying = UnmaskIns(survivors=(*honest.survivors, 37), dropped=(37,))
    with pytest.raises(ProtocolViolation, match="both shares"):
        clients[11].unmask(lying)
    # nor across two requests: a client answers one unmask request per round
    clients[5].unmask(honest)  # gives 37's mask-key share
    with pytest.raises(ProtocolViolation, match="expecting 'done'"):
        clients[5].unmask(UnmaskIns(survivors=tuple(sorted(NODES)), dropped=()))  # would give 37's seed share


def test_unmask_lists_that_do_not_split_the_share_set_are_refused():
    inputs = _inputs()
    _server, clients, reqs = _to_masked_input(inputs)
    for n, r in reqs.items():
        clients[n].masked_input(r, inputs[n])
    missing_one = tuple(sorted(set(NODES) - {37}))
    with pytest.raises(ProtocolViolation, match="do not split"):
        clients[11].unmask(UnmaskIns(survivors=missing_one, dropped=()))


def test_a_tampered_or_readdressed_share_ciphertext_is_refused_at_unmasking():
    inputs = _inputs()
    _server, clients, reqs = _to_masked_input(inputs)
    flipped_for_11 = dict(reqs[11].ciphertexts)
    bits = bytearray(flipped_for_11[5])
    bits[20] ^= 0x10
    flipped_for_11[5] = bytes(bits)
    swapped_for_8 = dict(reqs[8].ciphertexts)
    swapped_for_8[37], swapped_for_8[64] = swapped_for_8[64], swapped_for_8[37]  # sealed by the other sender
    clients[11].masked_input(MaskedInputIns(flipped_for_11), inputs[11])
    clients[8].masked_input(MaskedInputIns(swapped_for_8), inputs[8])
    split = UnmaskIns(survivors=(5, 8, 11, 1000), dropped=(37, 64, 902))
    for node in (11, 8):
        with pytest.raises(aead.Tampered):
            clients[node].unmask(split)


def test_out_of_order_requests_bad_thresholds_and_strangers_are_refused():
    with pytest.raises(ProtocolViolation, match="expecting 'advertise-keys'"):
        SecAggClient(5).unmask(UnmaskIns((5,), ()))
    with pytest.raises(ProtocolViolation, match=r"threshold 3 must be in \(3\.5, 7\]"):
        SecAggServer(NODES, 3, b"t", 4)
    server = SecAggServer(NODES, 4, b"t", 4)
    clients = {n: SecAggClient(n) for n in NODES}
    replies = {n: clients[n].advertise_keys(r) for n, r in server.setup().items()}
    replies[999] = replies[5]
    with pytest.raises(ProtocolViolation, match=r"not asked: \[999\]"):
        server.receive_keys(replies)


def _secure_sum(layout: Layout, values: dict[int, dict[str, np.ndarray]], drop) -> tuple[dict, tuple[int, ...]]:
    packed = {n: layout.pack(v, np.random.default_rng(n))[0] for n, v in values.items()}
    total, survivors = run_round(packed, threshold=4, drop=drop)
    return layout.unpack(total), survivors


def test_fedavg_vector_aggregates_like_plain_weighted_averaging():
    rng = np.random.default_rng(3)
    shapes = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,), "bn.running_var": (4,), "fc.weight": (10, 36)}
    layout = Layout((Segment("n", (1,), "exact"), Segment("loss", (1,)),
                     *(Segment(k, s) for k, s in shapes.items())))
    values, n_k, deltas, losses = {}, {}, {}, {}
    for node in NODES:
        n_k[node] = int(rng.integers(20, 600))
        losses[node] = float(rng.uniform(0.1, 3))
        deltas[node] = {k: rng.normal(0, 0.05, s) for k, s in shapes.items()}
        values[node] = {"n": np.array([n_k[node]]), "loss": np.array([n_k[node] * losses[node]]),
                        **{k: n_k[node] * d for k, d in deltas[node].items()}}
    sums, survivors = _secure_sum(layout, values, {"masked-input": {902}})
    total_n = sum(n_k[u] for u in survivors)
    assert int(sums["n"][0]) == total_n
    bound = layout.codec.sum_error_bound(len(survivors)) / total_n
    for k in shapes:
        plain = sum(n_k[u] * deltas[u][k] for u in survivors) / total_n
        assert np.abs(sums[k] / total_n - plain).max() < bound
    assert abs(sums["loss"][0] / total_n - sum(n_k[u] * losses[u] for u in survivors) / total_n) < bound


def test_redgrape_prototype_vector_gives_per_class_means_and_exact_holder_counts():
    classes, dim = 6, 5
    rng = np.random.default_rng(4)
    layout = Layout((Segment("proto_w", (classes, classes, dim)), Segment("proto_b", (classes, classes)),
                     Segment("holders", (classes,), "exact")))
    values, held, proto_w, proto_b = {}, {}, {}, {}
    for node in NODES:
        held[node] = rng.random(classes) < 0.5
        proto_w[node] = rng.normal(0, 1, (classes, classes, dim)) * held[node][:, None, None]  # zero if absent
        proto_b[node] = rng.normal(0, 1, (classes, classes)) * held[node][:, None]
        values[node] = {"proto_w": proto_w[node], "proto_b": proto_b[node], "holders": held[node].astype(np.int64)}
    sums, survivors = _secure_sum(layout, values, {"share-keys": {8}, "unmask": {11}})
    holders = sum(held[u].astype(np.int64) for u in survivors)
    assert np.array_equal(sums["holders"], holders)
    step = 1 / layout.codec.scale  # absent classes encode an exact 0, so a class mean is off by < 1 step
    for c in np.flatnonzero(holders):
        mean_w = sum(proto_w[u][c] for u in survivors if held[u][c]) / holders[c]
        mean_b = sum(proto_b[u][c] for u in survivors if held[u][c]) / holders[c]
        assert np.abs(sums["proto_w"][c] / holders[c] - mean_w).max() < step
        assert np.abs(sums["proto_b"][c] / holders[c] - mean_b).max() < step
    for c in np.flatnonzero(holders == 0):
        assert not sums["proto_w"][c].any() and not sums["proto_b"][c].any()
