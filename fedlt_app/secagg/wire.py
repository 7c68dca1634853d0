"""Stage messages and client snapshots <-> Flower ArrayRecords (uint8 / int64 arrays only).

Why arrays and not ConfigRecords: fedlt counts a message's bytes from its ArrayRecords
(``records.content_nbytes``), so keys, ciphertexts and shares then count in the measured overhead;
and node ids are unsigned 64-bit, which ConfigRecord's signed ints cannot hold.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord

from fedlt_app.secagg.aead import NONCE_BYTES
from fedlt_app.secagg.client import ClientSnapshot
from fedlt_app.secagg.keys import KEY_BYTES
from fedlt_app.secagg.layout import Segment
from fedlt_app.secagg.messages import (
    SHARE_PLAINTEXT_BYTES,
    MaskedInputIns,
    MaskedInputRes,
    PublicKeys,
    Setup,
    ShareKeysIns,
    ShareKeysRes,
    UnmaskIns,
    UnmaskRes,
)
from fedlt_app.secagg.shamir import SHARE_BYTES

CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + 16  # GCM tag

Arrays = dict[str, np.ndarray]


def _blob(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8).copy()


def _ids(nodes) -> np.ndarray:
    return _blob(np.asarray(list(nodes), dtype="<u8").tobytes())


def _from_ids(array: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in np.frombuffer(array.tobytes(), dtype="<u8"))


def _chunks(array: np.ndarray, size: int, count: int) -> list[bytes]:
    raw = array.tobytes()
    if len(raw) != size * count:
        raise ValueError(f"expected {count} items of {size} bytes, got {len(raw)} bytes")
    return [raw[i * size:(i + 1) * size] for i in range(count)]


def _keyed(nodes: tuple[int, ...], array: np.ndarray, size: int) -> dict[int, bytes]:
    return dict(zip(nodes, _chunks(array, size, len(nodes)), strict=True))


def setup_arrays(m: Setup) -> Arrays:
    return {"context": _blob(m.context), "cohort": _ids(m.cohort),
            "params": np.array([m.threshold, m.vector_length], dtype=np.int64)}


def setup_from(a: Arrays) -> Setup:
    threshold, length = (int(v) for v in a["params"])
    return Setup(a["context"].tobytes(), _from_ids(a["cohort"]), threshold, length)


def keys_arrays(m: PublicKeys) -> Arrays:
    return {"shares-public": _blob(m.shares_public), "mask-public": _blob(m.mask_public)}


def keys_from(a: Arrays) -> PublicKeys:
    return PublicKeys(a["shares-public"].tobytes(), a["mask-public"].tobytes())


def share_keys_ins_arrays(m: ShareKeysIns) -> Arrays:
    nodes = sorted(m.public_keys)
    return {"nodes": _ids(nodes),
            "shares-public": _blob(b"".join(m.public_keys[n].shares_public for n in nodes)),
            "mask-public": _blob(b"".join(m.public_keys[n].mask_public for n in nodes))}


def share_keys_ins_from(a: Arrays) -> ShareKeysIns:
    nodes = _from_ids(a["nodes"])
    shares = _keyed(nodes, a["shares-public"], KEY_BYTES)
    masks = _keyed(nodes, a["mask-public"], KEY_BYTES)
    return ShareKeysIns({n: PublicKeys(shares[n], masks[n]) for n in nodes})


def ciphertexts_arrays(ciphertexts: dict[int, bytes]) -> Arrays:
    """ShareKeysRes.ciphertexts (by receiver) or MaskedInputIns.ciphertexts (by sender)."""
    nodes = sorted(ciphertexts)
    return {"nodes": _ids(nodes), "ciphertexts": _blob(b"".join(ciphertexts[n] for n in nodes))}


def ciphertexts_from(a: Arrays) -> dict[int, bytes]:
    return _keyed(_from_ids(a["nodes"]), a["ciphertexts"], CIPHERTEXT_BYTES)


def share_keys_res_from(a: Arrays) -> ShareKeysRes:
    return ShareKeysRes(ciphertexts_from(a))


def masked_input_ins_from(a: Arrays) -> MaskedInputIns:
    return MaskedInputIns(ciphertexts_from(a))


def segments_arrays(segments: tuple[Segment, ...]) -> Arrays:
    """The method's segments of the round's layout (name, shape, kind), as JSON bytes: the server says
    what it will sum, so a client whose method disagrees fails loudly instead of packing another layout."""
    spec = [[s.name, list(s.shape), s.kind] for s in segments]
    return {"segments": _blob(json.dumps(spec).encode())}


def segments_from(a: Arrays) -> tuple[Segment, ...]:
    """Inverse of ``segments_arrays`` (none when the record holds no spec)."""
    if "segments" not in a:
        return ()
    return tuple(Segment(str(name), tuple(int(d) for d in shape), kind)
                 for name, shape, kind in json.loads(a["segments"].tobytes().decode()))


def weighting_arrays(weighting: str) -> Arrays:
    """How the clients weigh their deltas (``update.WEIGHTINGS``); nothing for the default, by sample count."""
    return {} if weighting == "examples" else {"weighting": _blob(weighting.encode())}


def weighting_from(a: Arrays) -> str:
    """Inverse of ``weighting_arrays``."""
    return a["weighting"].tobytes().decode() if "weighting" in a else "examples"


def masked_arrays(m: MaskedInputRes) -> Arrays:
    return {"masked": m.vector.view(np.int64)}  # Flower's Array round-trips int64 exactly


def masked_from(a: Arrays) -> MaskedInputRes:
    return MaskedInputRes(np.ascontiguousarray(a["masked"], dtype=np.int64).view(np.uint64))


def unmask_ins_arrays(m: UnmaskIns) -> Arrays:
    return {"survivors": _ids(m.survivors), "dropped": _ids(m.dropped)}


def unmask_ins_from(a: Arrays) -> UnmaskIns:
    return UnmaskIns(_from_ids(a["survivors"]), _from_ids(a["dropped"]))


def unmask_res_arrays(m: UnmaskRes) -> Arrays:
    seeds, key_shares = sorted(m.self_mask_shares), sorted(m.mask_key_shares)
    return {"seed-nodes": _ids(seeds), "seed-shares": _blob(b"".join(m.self_mask_shares[n] for n in seeds)),
            "key-nodes": _ids(key_shares), "key-shares": _blob(b"".join(m.mask_key_shares[n] for n in key_shares))}


def unmask_res_from(a: Arrays) -> UnmaskRes:
    return UnmaskRes(_keyed(_from_ids(a["seed-nodes"]), a["seed-shares"], SHARE_BYTES),
                     _keyed(_from_ids(a["key-nodes"]), a["key-shares"], SHARE_BYTES))


def to_record(arrays: Arrays) -> ArrayRecord:
    """Arrays -> a Flower ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    """A Flower ArrayRecord -> arrays."""
    return {k: v.numpy() for k, v in record.items()}


def snapshot_arrays(s: ClientSnapshot) -> Arrays:
    """A client snapshot as prefixed arrays (for context.state)."""
    out: Arrays = {"node": _ids([s.node_id]), "next-stage": _blob(s.next_stage.encode())}
    parts: list[tuple[str, Arrays | None]] = [
        ("setup.", setup_arrays(s.setup) if s.setup else None),
        ("public.", share_keys_ins_arrays(s.public) if s.public else None),
        ("received.", ciphertexts_arrays(s.received.ciphertexts) if s.received else None)]
    for prefix, arrays in parts:
        for k, v in (arrays or {}).items():
            out[prefix + k] = v
    for name in ("shares_key", "mask_key", "seed"):
        value = getattr(s, name)
        if value is not None:
            out[name] = _blob(value)
    if s.own_shares is not None:
        out["own-shares"] = _blob(b"".join(s.own_shares))
    return out


def snapshot_from(a: Arrays) -> ClientSnapshot:
    """Inverse of ``snapshot_arrays``."""
    def sub(prefix: str) -> Arrays | None:
        found = {k[len(prefix):]: v for k, v in a.items() if k.startswith(prefix)}
        return found or None

    setup, public, received = sub("setup."), sub("public."), sub("received.")
    raw = {name: a[name].tobytes() if name in a else None for name in ("shares_key", "mask_key", "seed")}
    own = a["own-shares"].tobytes() if "own-shares" in a else None
    return ClientSnapshot(
        _from_ids(a["node"])[0], a["next-stage"].tobytes().decode(),
        setup_from(setup) if setup else None, raw["shares_key"], raw["mask_key"],
        share_keys_ins_from(public) if public else None, raw["seed"],
        (own[:SHARE_BYTES], own[SHARE_BYTES:]) if own is not None else None,
        masked_input_ins_from(received) if received else None)
