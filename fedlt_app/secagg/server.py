"""The server's side of one secure-aggregation round: routes messages, then removes the masks.

It sees public keys, ciphertexts it cannot open, masked vectors and, at the end, t shares of each
survivor's self-mask seed and of each dropout's mask key: enough to remove every mask from the sum
and nothing that removes a mask from one vector alone.  Each stage aborts with ``BelowThreshold``
when fewer than ``threshold`` of the clients asked answer; replies from nodes not asked are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlt_app.secagg import keys, shamir
from fedlt_app.secagg.client import pairwise_sign
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
)
from fedlt_app.secagg.prg import mask_vector


class SecAggServer:
    """Drives one round: ``setup`` then the four ``receive_*`` calls, each fed the replies that came back."""

    def __init__(self, cohort: Sequence[int], threshold: int, context: bytes, vector_length: int) -> None:
        if len(set(cohort)) != len(cohort):
            raise ValueError("the cohort repeats a node")
        check_threshold(threshold, len(cohort))
        self.setup_message = Setup(context, tuple(cohort), threshold, vector_length)
        self._x = {node: i + 1 for i, node in enumerate(cohort)}
        self._next = STAGES[0]
        self.survivors: tuple[int, ...] = ()

    @property
    def threshold(self) -> int:
        """Minimum number of answering clients at every stage."""
        return self.setup_message.threshold

    def setup(self) -> dict[int, Setup]:
        """The advertise-keys request for every node of the cohort."""
        return {node: self.setup_message for node in self.setup_message.cohort}

    def _accept(self, stage: str, replies: Mapping[int, object], asked: set[int]) -> set[int]:
        if self._next != stage:
            raise ProtocolViolation(f"server: {stage!r} replies while expecting {self._next!r}")
        strangers = set(replies) - asked
        if strangers:
            raise ProtocolViolation(f"server at {stage!r}: replies from nodes not asked: {sorted(strangers)}")
        if len(replies) < self.threshold:
            raise BelowThreshold(
                f"secure aggregation stopped at stage {stage!r}: {len(replies)} of {len(asked)} clients answered, "
                f"threshold is {self.threshold}")
        i = STAGES.index(stage)
        self._next = STAGES[i + 1] if i + 1 < len(STAGES) else "done"
        return set(replies)

    def receive_keys(self, replies: Mapping[int, PublicKeys]) -> dict[int, ShareKeysIns]:
        """U1 = who advertised keys; each of them gets every key."""
        u1 = self._accept("advertise-keys", replies, set(self.setup_message.cohort))
        self._public = dict(replies)
        ins = ShareKeysIns(dict(replies))
        return {node: ins for node in sorted(u1)}

    def receive_shares(self, replies: Mapping[int, ShareKeysRes]) -> dict[int, MaskedInputIns]:
        """U2 = who sent shares; each member of U2 gets the ciphertexts the others sealed for it."""
        u1 = set(self._public)
        u2 = self._accept("share-keys", replies, u1)
        for u, res in replies.items():
            if set(res.ciphertexts) != u1 - {u}:
                raise ProtocolViolation(f"server: node {u} sent shares for {sorted(res.ciphertexts)}, "
                                        f"not for the key set minus itself")
        self._u2 = u2
        return {v: MaskedInputIns({u: replies[u].ciphertexts[v] for u in sorted(u2 - {v})}) for v in sorted(u2)}

    def receive_masked(self, replies: Mapping[int, MaskedInputRes]) -> dict[int, UnmaskIns]:
        """U3 = who sent a masked vector; adds them up and asks U3 for the shares that unmask the sum."""
        u3 = self._accept("masked-input", replies, self._u2)
        length = self.setup_message.vector_length
        total = np.zeros(length, dtype=np.uint64)
        for u, res in replies.items():
            if res.vector.dtype != np.uint64 or res.vector.shape != (length,):
                raise ProtocolViolation(f"server: node {u} sent a {res.vector.dtype} vector of shape "
                                        f"{res.vector.shape}, expected uint64 ({length},)")
            total += res.vector
        self._total = total
        self.survivors = tuple(sorted(u3))
        self._dropped = tuple(sorted(self._u2 - u3))
        check_unmask_lists(self.survivors, self._dropped)
        ins = UnmaskIns(self.survivors, self._dropped)
        return {u: ins for u in self.survivors}

    def receive_unmask(self, replies: Mapping[int, UnmaskRes]) -> np.ndarray:
        """Recovers every survivor's self-mask and every dropout's pairwise masks; returns the plain sum."""
        self._accept("unmask", replies, set(self.survivors))
        length = self.setup_message.vector_length
        total = self._total
        for u in self.survivors:
            seed = self._recover(u, {r: res.self_mask_shares for r, res in replies.items()})
            total = total - mask_vector(seed, length)
        context = self.setup_message.context
        for v in self._dropped:
            raw = self._recover(v, {r: res.mask_key_shares for r, res in replies.items()})
            private = keys.private_from_bytes(raw)
            if keys.public_bytes(private) != self._public[v].mask_public:
                raise ProtocolViolation(f"server: the recovered mask key of node {v} does not match its public key")
            for u in self.survivors:  # u added sign(u, v) * mask(u, v); take it out
                mask = mask_vector(keys.agree(private, self._public[u].mask_public, keys.PURPOSE_MASK, context), length)
                total = total - mask if pairwise_sign(u, v) > 0 else total + mask
        return total

    def _recover(self, node: int, shares_by_replier: Mapping[int, Mapping[int, bytes]]) -> bytes:
        """Node's secret from the repliers' shares; each share's x must be its replier's position."""
        shares = []
        for replier, shares_of in shares_by_replier.items():
            if node not in shares_of:
                raise ProtocolViolation(f"server: node {replier} sent no share for node {node}")
            share = shamir.Share.from_bytes(shares_of[node])
            if share.x != self._x[replier]:
                raise ProtocolViolation(f"server: node {replier} sent a share at x={share.x}, "
                                        f"its position is {self._x[replier]}")
            shares.append(share)
        return shamir.recover(shares, self.threshold)
