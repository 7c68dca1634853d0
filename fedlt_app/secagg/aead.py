"""AES-256-GCM for the share messages, which travel client -> server -> client.

The server routes them but must not read them (they hold Shamir shares) nor alter them unnoticed:
GCM authenticates the ciphertext and the associated data (round context, sender, receiver), so a
flipped bit, a truncated message, or a ciphertext re-addressed to another pair raises ``Tampered``.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12


class Tampered(ValueError):
    """A ciphertext failed authentication: altered, truncated, or meant for another pair or round."""


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """nonce | AES-GCM(key, nonce, plaintext, associated); a fresh random nonce per message."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of ``seal``'s output, or ``Tampered``."""
    if len(sealed) < NONCE_BYTES + 16:
        raise Tampered("ciphertext too short")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
    except InvalidTag as err:
        raise Tampered("share ciphertext failed authentication (tampered or misaddressed)") from err
