"""The protocol's stage messages (server request / client reply per stage) and their shared checks.

Stages, in order (Bonawitz et al. 2017, honest-but-curious variant without the consistency round):
``advertise-keys`` (two X25519 public keys per client), ``share-keys`` (encrypted Shamir shares of the
self-mask seed and of the mask private key, routed through the server), ``masked-input`` (the masked
vector), ``unmask`` (survivors' self-mask shares, dropouts' mask-key shares).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from fedlt_app.secagg.errors import ProtocolViolation
from fedlt_app.secagg.shamir import SHARE_BYTES

STAGES = ("advertise-keys", "share-keys", "masked-input", "unmask")


@dataclass(frozen=True)
class Setup:
    """advertise-keys request: the round's public parameters. Shamir x of ``cohort[i]`` is i + 1."""

    context: bytes  # binds keys and ciphertexts to this run and round
    cohort: tuple[int, ...]
    threshold: int
    vector_length: int


@dataclass(frozen=True)
class PublicKeys:
    """advertise-keys reply: the key for share encryption and the key for pairwise masks."""

    shares_public: bytes
    mask_public: bytes


@dataclass(frozen=True)
class ShareKeysIns:
    """share-keys request: every public key the server received (the set U1)."""

    public_keys: dict[int, PublicKeys]


@dataclass(frozen=True)
class ShareKeysRes:
    """share-keys reply: receiver node -> sealed (sender, receiver, mask-key share, self-mask share)."""

    ciphertexts: dict[int, bytes]


@dataclass(frozen=True)
class MaskedInputIns:
    """masked-input request: sender node -> the ciphertext it sealed for this client (senders + self = U2)."""

    ciphertexts: dict[int, bytes]


@dataclass(frozen=True)
class MaskedInputRes:
    """masked-input reply: the vector plus self-mask plus pairwise masks, in Z_{2^64}."""

    vector: np.ndarray


@dataclass(frozen=True)
class UnmaskIns:
    """unmask request: who sent a masked vector (U3) and who shared keys but did not (U2 minus U3)."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskRes:
    """unmask reply: self-mask-seed shares of survivors, mask-key shares of dropouts (node -> share)."""

    self_mask_shares: dict[int, bytes]
    mask_key_shares: dict[int, bytes]


def check_unmask_lists(survivors: tuple[int, ...], dropped: tuple[int, ...]) -> None:
    """Refuses a request naming one node in both lists: its two shares would unmask its lone vector."""
    both = set(survivors) & set(dropped)
    if both:
        raise ProtocolViolation(f"unmask request asks for both shares of node(s) {sorted(both)}: refused")
    if len(set(survivors)) != len(survivors) or len(set(dropped)) != len(dropped):
        raise ProtocolViolation("unmask request repeats a node")


_IDS = struct.Struct(">QQ")
SHARE_PLAINTEXT_BYTES = _IDS.size + 2 * SHARE_BYTES


def share_associated_data(context: bytes, sender: int, receiver: int) -> bytes:
    """What AES-GCM authenticates besides the plaintext: round, sender, receiver."""
    return context + b"|" + _IDS.pack(sender, receiver)


def pack_share_plaintext(sender: int, receiver: int, mask_key_share: bytes, self_mask_share: bytes) -> bytes:
    """The plaintext of one share message."""
    return _IDS.pack(sender, receiver) + mask_key_share + self_mask_share


def unpack_share_plaintext(raw: bytes) -> tuple[int, int, bytes, bytes]:
    """(sender, receiver, mask-key share, self-mask share) from ``pack_share_plaintext``'s bytes."""
    if len(raw) != SHARE_PLAINTEXT_BYTES:
        raise ProtocolViolation(f"share plaintext has {len(raw)} bytes, expected {SHARE_PLAINTEXT_BYTES}")
    sender, receiver = _IDS.unpack_from(raw)
    body = raw[_IDS.size:]
    return sender, receiver, body[:SHARE_BYTES], body[SHARE_BYTES:]


def check_threshold(threshold: int, cohort_size: int) -> None:
    """A threshold must be a strict majority of the cohort and at most the cohort (Bonawitz et al.)."""
    if not cohort_size // 2 < threshold <= cohort_size:
        raise ProtocolViolation(
            f"threshold {threshold} must be in ({cohort_size / 2:g}, {cohort_size}] for a cohort of {cohort_size}")


def default_threshold(cohort_size: int) -> int:
    """floor(2K/3) + 1, as Flower's SecAgg+ and the notes suggest (tolerates a third dropping)."""
    return min(cohort_size, 2 * cohort_size // 3 + 1)
