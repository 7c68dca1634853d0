"""The mask generator: a 32-byte secret expanded by AES-256-CTR into a uniform vector in Z_{2^64}.

Why not numpy's generators (Flower's SecAgg+ folds the key into a 32-bit MT19937 seed): a mask must be
unpredictable without the whole 256-bit secret.  Every key is used for exactly one stream (self-mask
seeds are fresh per round, pairwise keys are derived with the round in the HKDF info), so a fixed zero
counter block is safe.  Uniform 64-bit words are uniform in Z_{2^64}: no rejection sampling needed.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
_CHUNK_WORDS = 1 << 20  # 8 MiB of keystream per update call


def mask_vector(key: bytes, length: int) -> np.ndarray:
    """The mask for ``key``: ``length`` little-endian uint64 words of AES-256-CTR keystream."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a mask key has {KEY_BYTES} bytes, got {len(key)}")
    if length < 0:
        raise ValueError(f"mask length must be >= 0, got {length}")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    out = np.empty(length, dtype="<u8")
    for start in range(0, length, _CHUNK_WORDS):
        n = min(_CHUNK_WORDS, length - start)
        out[start:start + n] = np.frombuffer(encryptor.update(bytes(8 * n)), dtype="<u8")
    return out.astype(np.uint64, copy=False)
