"""X25519 key agreement + HKDF-SHA256: the pairwise secrets of the protocol.

Each client holds two key pairs per round: one whose agreements key the share messages' encryption
(``PURPOSE_SHARES``) and one whose agreements seed the pairwise masks (``PURPOSE_MASK``); the second
private key is what survivors' Shamir shares let the server rebuild when a client drops after sharing.
The HKDF info binds each derived key to its purpose and to the round's context bytes, so a key never
serves two purposes or two rounds.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PURPOSE_SHARES = b"fedlt-secagg/shares"
PURPOSE_MASK = b"fedlt-secagg/mask"
KEY_BYTES = 32


def new_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key (from the OS's cryptographic generator)."""
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key (what gets Shamir-shared)."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    """Rebuilds a private key from its 32 raw bytes."""
    return X25519PrivateKey.from_private_bytes(raw)


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of the public key that goes to the server."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(own: X25519PrivateKey, peer_public: bytes, purpose: bytes, context: bytes) -> bytes:
    """The 32-byte key both ends derive: HKDF-SHA256(X25519(own, peer), info = purpose | context).

    Symmetric: agree(a, pub(b), ...) == agree(b, pub(a), ...).
    """
    if len(peer_public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key has {KEY_BYTES} bytes, got {len(peer_public)}")
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=purpose + b"|" + context).derive(shared)
