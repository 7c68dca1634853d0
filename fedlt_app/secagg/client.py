"""A client's side of one secure-aggregation round, as a state machine that refuses out-of-order calls.

The client checks every request against what it already knows (its cohort, the key set U1, the share
set U2), so a server that lies about who dropped cannot make it reveal both shares of one node:
it answers exactly one unmask request, and only one that splits U2 into disjoint survivors and dropouts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from fedlt_app.secagg import aead, keys, shamir
from fedlt_app.secagg.errors import BelowThreshold, ProtocolViolation
from fedlt_app.secagg.messages import (
    STAGES,
    MaskedInputIns,
    MaskedInputRes,
    PublicKeys,
    Setup,
    ShareKeysIns,
    ShareKeysRes,
    UnmaskIns,
    UnmaskRes,
    check_threshold,
    check_unmask_lists,
    pack_share_plaintext,
    share_associated_data,
    unpack_share_plaintext,
)
from fedlt_app.secagg.prg import mask_vector


def pairwise_sign(own: int, peer: int) -> int:
    """+1 if ``own`` adds the pair's mask, -1 if it subtracts it: the two ends cancel in the sum."""
    return 1 if own < peer else -1


@dataclass(frozen=True)
class ClientSnapshot:
    """Everything a client holds between two messages of a round (a ClientApp keeps it in context.state).

    ``None`` for what the client does not hold yet (or no longer: the seed is dropped once masking is done).
    """

    node_id: int
    next_stage: str
    setup: Setup | None = None
    shares_key: bytes | None = None
    mask_key: bytes | None = None
    public: ShareKeysIns | None = None
    seed: bytes | None = None
    own_shares: tuple[bytes, bytes] | None = None
    received: MaskedInputIns | None = None


class SecAggClient:
    """One node's secrets and checks for one round; call the four stage methods in order."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self._next = STAGES[0]

    def snapshot(self) -> ClientSnapshot:
        """The client's state, to survive between messages (``restore`` is the inverse)."""
        has = self.__dict__.get
        key = has("_shares_key")
        mask = has("_mask_key")
        public, received = has("_public"), has("_received")
        return ClientSnapshot(
            self.node_id, self._next, has("setup"),
            keys.private_bytes(key) if key is not None else None,
            keys.private_bytes(mask) if mask is not None else None,
            ShareKeysIns(dict(public)) if public is not None else None,
            has("_seed"), has("_own_shares"),
            MaskedInputIns(dict(received)) if received is not None else None)

    @classmethod
    def restore(cls, snap: ClientSnapshot) -> SecAggClient:
        """A client in the state ``snap`` recorded."""
        client = cls(snap.node_id)
        client._next = snap.next_stage
        if snap.setup is not None:
            client.setup = snap.setup
            client._x = {node: i + 1 for i, node in enumerate(snap.setup.cohort)}
        if snap.shares_key is not None and snap.mask_key is not None:
            client._shares_key = keys.private_from_bytes(snap.shares_key)
            client._mask_key = keys.private_from_bytes(snap.mask_key)
            client._own = PublicKeys(keys.public_bytes(client._shares_key), keys.public_bytes(client._mask_key))
        if snap.public is not None:
            client._public = dict(snap.public.public_keys)
        if snap.seed is not None:
            client._seed = snap.seed
        if snap.own_shares is not None:
            client._own_shares = snap.own_shares
        if snap.received is not None:
            client._received = dict(snap.received.ciphertexts)
        return client

    def _enter(self, stage: str) -> None:
        if self._next != stage:
            raise ProtocolViolation(f"node {self.node_id}: got a {stage!r} request while expecting {self._next!r}")
        i = STAGES.index(stage)
        self._next = STAGES[i + 1] if i + 1 < len(STAGES) else "done"

    def _need(self, count: int, stage: str) -> None:
        if count < self.setup.threshold:
            raise BelowThreshold(f"node {self.node_id} at {stage!r}: {count} clients left, "
                                 f"threshold {self.setup.threshold}")

    def advertise_keys(self, setup: Setup) -> PublicKeys:
        """Stage 1: checks the parameters and makes this round's two key pairs."""
        self._enter("advertise-keys")
        if len(set(setup.cohort)) != len(setup.cohort) or self.node_id not in setup.cohort:
            raise ProtocolViolation(f"node {self.node_id}: cohort repeats a node or leaves this one out")
        check_threshold(setup.threshold, len(setup.cohort))
        if setup.vector_length < 0:
            raise ProtocolViolation(f"vector length must be >= 0, got {setup.vector_length}")
        self.setup = setup
        self._x = {node: i + 1 for i, node in enumerate(setup.cohort)}
        self._shares_key = keys.new_private_key()
        self._mask_key = keys.new_private_key()
        self._own = PublicKeys(keys.public_bytes(self._shares_key), keys.public_bytes(self._mask_key))
        return self._own

    def share_keys(self, ins: ShareKeysIns) -> ShareKeysRes:
        """Stage 2: Shamir-shares the self-mask seed and the mask private key, one sealed message per peer."""
        self._enter("share-keys")
        u1 = set(ins.public_keys)
        if not u1 <= set(self.setup.cohort) or ins.public_keys.get(self.node_id) != self._own:
            raise ProtocolViolation(f"node {self.node_id}: key set names strangers or alters this node's keys")
        self._need(len(u1), "share-keys")
        announced = list(ins.public_keys.values())
        published = [k.shares_public for k in announced] + [k.mask_public for k in announced]
        if len(set(published)) != len(published):
            raise ProtocolViolation(f"node {self.node_id}: the key set repeats a public key")
        self._public = dict(ins.public_keys)
        self._seed = os.urandom(shamir.SECRET_BYTES)
        xs = [self._x[v] for v in sorted(u1)]
        seed_shares = shamir.split(self._seed, xs, self.setup.threshold)
        key_shares = shamir.split(keys.private_bytes(self._mask_key), xs, self.setup.threshold)
        self._own_shares = (key_shares[self._x[self.node_id]].to_bytes(), seed_shares[self._x[self.node_id]].to_bytes())
        out = {}
        for v in sorted(u1 - {self.node_id}):
            plain = pack_share_plaintext(self.node_id, v, key_shares[self._x[v]].to_bytes(),
                                         seed_shares[self._x[v]].to_bytes())
            out[v] = aead.seal(self._pair_key(v), plain, share_associated_data(self.setup.context, self.node_id, v))
        return ShareKeysRes(out)

    def masked_input(self, ins: MaskedInputIns, vector: np.ndarray) -> MaskedInputRes:
        """Stage 3: vector + self-mask + a pairwise mask for every other node that shared keys (U2)."""
        self._enter("masked-input")
        senders = set(ins.ciphertexts)
        if self.node_id in senders or not senders <= set(self._public):
            raise ProtocolViolation(f"node {self.node_id}: share senders are not a subset of the key set")
        self._need(len(senders) + 1, "masked-input")
        if vector.dtype != np.uint64 or vector.shape != (self.setup.vector_length,):
            raise ValueError(f"the input must be uint64 of shape ({self.setup.vector_length},), "
                             f"got {vector.dtype} {vector.shape}")
        self._received = dict(ins.ciphertexts)
        masked = vector + mask_vector(self._seed, vector.size)
        for v in sorted(senders):
            mask = mask_vector(keys.agree(self._mask_key, self._public[v].mask_public, keys.PURPOSE_MASK,
                                          self.setup.context), vector.size)
            masked = masked + mask if pairwise_sign(self.node_id, v) > 0 else masked - mask
        del self._seed  # only the shares remain
        return MaskedInputRes(masked)

    def unmask(self, ins: UnmaskIns) -> UnmaskRes:
        """Stage 4 (answered once): self-mask shares of survivors, mask-key shares of dropouts."""
        self._enter("unmask")
        check_unmask_lists(ins.survivors, ins.dropped)
        u2 = set(self._received) | {self.node_id}
        if set(ins.survivors) | set(ins.dropped) != u2 or self.node_id not in ins.survivors:
            raise ProtocolViolation(f"node {self.node_id}: unmask lists do not split the share set into "
                                    "survivors (this node among them) and dropouts")
        self._need(len(ins.survivors), "unmask")
        seed_shares, key_shares = {}, {}
        for v in ins.survivors:
            seed_shares[v] = self._own_shares[1] if v == self.node_id else self._open(v)[1]
        for v in ins.dropped:
            key_shares[v] = self._open(v)[0]
        return UnmaskRes(seed_shares, key_shares)

    def _pair_key(self, peer: int) -> bytes:
        return keys.agree(self._shares_key, self._public[peer].shares_public, keys.PURPOSE_SHARES, self.setup.context)

    def _open(self, sender: int) -> tuple[bytes, bytes]:
        """(mask-key share, self-mask share) that ``sender`` sealed for this node; refuses tampering."""
        plain = aead.open_sealed(self._pair_key(sender), self._received[sender],
                                 share_associated_data(self.setup.context, sender, self.node_id))
        s, r, key_share, seed_share = unpack_share_plaintext(plain)
        if (s, r) != (sender, self.node_id):
            raise ProtocolViolation(f"node {self.node_id}: a share message names sender {s}, receiver {r}")
        return key_share, seed_share
