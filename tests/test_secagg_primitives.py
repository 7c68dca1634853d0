"""Secure-aggregation primitives: fixed point, mask generator, key agreement, Shamir, AES-GCM."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedlt_app.secagg import aead, keys, shamir
from fedlt_app.secagg.fixedpoint import FixedPoint, decode_exact, encode_exact
from fedlt_app.secagg.prg import mask_vector


def test_round_trip_within_one_step_and_exact_on_the_grid():
    codec = FixedPoint()
    x = np.random.default_rng(1).normal(0, 100, 5000)
    enc, clipped = codec.encode(x, np.random.default_rng(2))
    assert enc.dtype == np.uint64 and clipped == 0
    err = np.abs(codec.decode(enc) - x)
    assert err.max() < 1 / codec.scale
    on_grid = np.array([0.0, 3.0, -7.5, 12345 / codec.scale, -1 / codec.scale])
    assert np.array_equal(codec.decode(codec.encode(on_grid, np.random.default_rng(0))[0]), on_grid)


def test_stochastic_rounding_is_seeded_and_unbiased():
    codec = FixedPoint(scale_bits=10)
    s = codec.scale
    x = np.full(200_000, (17 + 0.3) / s)  # 0.3 of a step above a grid point
    first = codec.encode(x, np.random.default_rng(5))[0]
    assert np.array_equal(first, codec.encode(x, np.random.default_rng(5))[0])
    assert not np.array_equal(first, codec.encode(x, np.random.default_rng(6))[0])
    decoded = codec.decode(first)
    assert set(np.unique(decoded * s)) == {17.0, 18.0}
    # std of the mean is sqrt(0.3 * 0.7 / n) / s; round-to-nearest would be 0.3 / s off
    tolerance = 5 * np.sqrt(0.21 / x.size) / s
    assert tolerance < 0.3 / s / 10
    assert abs(decoded.mean() - x[0]) < tolerance


def test_modulus_holds_the_documented_federation_and_refuses_overflow():
    codec = FixedPoint()
    assert codec.max_clients >= 100_000
    n = np.uint64(codec.max_clients)
    for sign in (1.0, -1.0):
        one = codec.encode(np.array([sign * codec.clip, sign * codec.clip / 3]), np.random.default_rng(0))[0]
        total = one * n  # = the sum of max_clients such vectors, mod 2^64
        expected = np.array([sign * codec.clip, sign * codec.clip / 3]) * codec.max_clients
        assert np.allclose(codec.decode(total), expected, rtol=0, atol=codec.sum_error_bound(codec.max_clients))
    with pytest.raises(ValueError, match="overflows"):
        FixedPoint(scale_bits=24, clip=2.0**22, max_clients=2**17)
    with pytest.raises(ValueError, match="overflows"):
        FixedPoint(scale_bits=40, clip=2.0**10, max_clients=100_000)


def test_out_of_range_values_are_clipped_and_counted_and_nan_refused():
    codec = FixedPoint(scale_bits=8, clip=4.0, max_clients=10)
    enc, clipped = codec.encode(np.array([5.0, -9.0, 1.0, 4.0]), np.random.default_rng(0))
    assert clipped == 2
    assert np.array_equal(codec.decode(enc), [4.0, -4.0, 1.0, 4.0])
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.array([np.nan]), np.random.default_rng(0))


def test_exact_segments_sum_without_rounding_and_refuse_fractions():
    a, b = encode_exact(np.array([3, -2, 0]), bound=10), encode_exact(np.array([-5, 7, 1]), bound=10)
    assert np.array_equal(decode_exact(a + b), [-2, 5, 1])
    with pytest.raises(ValueError, match="integers"):
        encode_exact(np.array([0.5]), bound=10)
    with pytest.raises(ValueError, match="bound"):
        encode_exact(np.array([11]), bound=10)


def test_mask_generator_is_deterministic_and_uses_the_whole_key():
    key = bytes(range(32))
    m = mask_vector(key, 10_000)
    assert m.dtype == np.uint64 and m.shape == (10_000,)
    assert np.array_equal(m, mask_vector(key, 10_000))
    assert np.array_equal(mask_vector(key, 7), m[:7])
    other = bytearray(key)
    other[31] ^= 1  # a change in the last byte (a 32-bit seed fold would keep only the first 4)
    assert np.count_nonzero(m == mask_vector(bytes(other), 10_000)) == 0
    assert abs((m >> np.uint64(63)).mean() - 0.5) < 0.03  # top bit balanced: spans all of Z_2^64


def test_key_agreement_is_symmetric_and_bound_to_purpose_and_context():
    a, b, c = keys.new_private_key(), keys.new_private_key(), keys.new_private_key()
    ab = keys.agree(a, keys.public_bytes(b), keys.PURPOSE_MASK, b"round-1")
    assert ab == keys.agree(b, keys.public_bytes(a), keys.PURPOSE_MASK, b"round-1") and len(ab) == 32
    assert ab != keys.agree(a, keys.public_bytes(b), keys.PURPOSE_SHARES, b"round-1")
    assert ab != keys.agree(a, keys.public_bytes(b), keys.PURPOSE_MASK, b"round-2")
    assert ab != keys.agree(a, keys.public_bytes(c), keys.PURPOSE_MASK, b"round-1")
    rebuilt = keys.private_from_bytes(keys.private_bytes(a))
    assert keys.public_bytes(rebuilt) == keys.public_bytes(a)


def test_shamir_any_threshold_subset_recovers_and_fewer_are_refused():
    secret = bytes([0xFF]) * 32  # the largest secret
    shares = shamir.split(secret, [1, 2, 3, 4, 5], threshold=3)
    for subset in itertools.combinations(shares.values(), 3):
        assert shamir.recover(list(subset), 3) == secret
    assert shamir.recover(list(shares.values()), 3) == secret
    with pytest.raises(ValueError, match="cannot recover"):
        shamir.recover([shares[1], shares[2]], 3)
    with pytest.raises(ValueError, match="duplicate"):
        shamir.recover([shares[1], shares[1], shares[2]], 3)
    # the coefficients are fresh randomness: two splits of one secret give different shares
    assert shamir.split(secret, [1, 2, 3], 3)[1] != shamir.split(secret, [1, 2, 3], 3)[1]
    assert shamir.Share.from_bytes(shares[4].to_bytes()) == shares[4]


def test_tampered_or_misaddressed_ciphertext_is_refused():
    key = bytes(32)
    sealed = aead.seal(key, b"share bytes", b"ctx|1->2")
    assert aead.open_sealed(key, sealed, b"ctx|1->2") == b"share bytes"
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    for bad, associated in ((bytes(flipped), b"ctx|1->2"), (sealed[:-1], b"ctx|1->2"), (sealed, b"ctx|3->2"),
                            (sealed[:10], b"ctx|1->2")):
        with pytest.raises(aead.Tampered):
            aead.open_sealed(key, bad, associated)
