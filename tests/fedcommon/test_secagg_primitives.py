"""Secure-aggregation primitives: Shamir t-of-n, pairwise masks cancel, the PRG, the fixed-point quantizer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedcommon import secagg as sa


def test_shamir_reconstructs_from_every_t_of_n_and_fails_below_t() -> None:
    # Prepare
    secret = bytes(range(32))
    shares = sa.shamir_split(secret, 3, [1, 2, 3, 4, 5])
    # Execute / Assert: every 3-subset gives the secret back
    for subset in itertools.combinations(shares.values(), 3):
        assert sa.shamir_combine(list(subset), 3) == secret
    # fewer than t shares are refused, and interpolating them as if t were 2 gives something else
    with pytest.raises(sa.SecAggCryptoError, match="2 distinct shares, 3 needed"):
        sa.shamir_combine([shares[1], shares[4]], 3)
    try:  # a line through 2 points of a degree-2 polynomial: not the secret (almost surely not even 32 bytes)
        wrong: bytes | None = sa.shamir_combine([shares[1], shares[4]], 2)
    except sa.SecAggCryptoError:
        wrong = None
    assert wrong != secret
    # a duplicated share does not count twice
    with pytest.raises(sa.SecAggCryptoError):
        sa.shamir_combine([shares[2], shares[2], shares[3]], 3)


def test_shamir_refuses_bad_arguments() -> None:
    with pytest.raises(sa.SecAggCryptoError, match="threshold"):
        sa.shamir_split(b"x" * 32, 6, [1, 2, 3, 4, 5])
    with pytest.raises(sa.SecAggCryptoError, match="32 bytes"):
        sa.shamir_split(b"x" * 31, 2, [1, 2])
    with pytest.raises(sa.SecAggCryptoError, match="distinct"):
        sa.shamir_split(b"x" * 32, 2, [1, 1])


def test_pairwise_masks_cancel_and_self_masks_hide() -> None:
    # Prepare: 4 sites, each with an X25519 mask key; every pair derives the same seed from its two keys
    names = ["a", "b", "c", "d"]
    keys = {n: sa.new_private_key() for n in names}
    ctx = sa.mask_context("fed", 1)
    n = 1000
    inputs = {s: np.arange(n, dtype=np.uint64) * np.uint64(i + 1) for i, s in enumerate(names)}
    # Execute: each site adds +/- PRG(s_uv) for every other site
    masked = {}
    for u in names:
        y = inputs[u].copy()
        for v in names:
            if v != u:
                m = sa.prg(sa.agree(keys[u], sa.public_bytes(keys[v]), ctx), n)
                y = y + m if sa.pairwise_sign(u, v) > 0 else y - m
        masked[u] = y
    # Assert: the masked sum is the plain sum (mod 2^64), while each masked input looks nothing like its input
    assert np.array_equal(sum(masked.values(), np.zeros(n, np.uint64)), sum(inputs.values(), np.zeros(n, np.uint64)))
    for u in names:
        assert np.mean(masked[u] == inputs[u]) < 0.01
    assert sa.agree(keys["a"], sa.public_bytes(keys["b"]), ctx) == sa.agree(keys["b"], sa.public_bytes(keys["a"]), ctx)
    assert sa.agree(keys["a"], sa.public_bytes(keys["b"]), ctx) != sa.agree(keys["a"], sa.public_bytes(keys["b"]),
                                                                            sa.mask_context("fed", 2))


def test_prg_is_deterministic_per_seed() -> None:
    assert np.array_equal(sa.prg(b"s" * 32, 10), sa.prg(b"s" * 32, 10))
    assert not np.array_equal(sa.prg(b"s" * 32, 10), sa.prg(b"t" * 32, 10))
    assert np.array_equal(sa.prg(b"s" * 32, 10)[:4], sa.prg(b"s" * 32, 4))


def test_share_encryption_is_bound_to_sender_and_recipient() -> None:
    key = b"k" * 32
    blob = sa.encrypt(key, b"share", sa.share_aad("fed", 1, "a", "b"))
    assert sa.decrypt(key, blob, sa.share_aad("fed", 1, "a", "b")) == b"share"
    with pytest.raises(sa.SecAggCryptoError, match="does not decrypt"):
        sa.decrypt(key, blob, sa.share_aad("fed", 1, "c", "b"))


def test_quantizer_error_bound_and_refusal() -> None:
    # Prepare: step = 8 / 2^11 = 1/256
    q = sa.Quantizer(clip_range=8.0, bits=12)
    rng = np.random.default_rng(0)
    xs = [rng.uniform(-1, 1, 500) for _ in range(5)]
    # Execute: sum 5 quantised inputs modulo 2^64
    total = np.zeros(500, np.uint64)
    for x in xs:
        total += q.quantize(x)
    got = q.dequantize(total)
    # Assert: within N * step / 2 of the exact sum, and negative values survive the wrap-around
    err = np.abs(got - sum(xs)).max()
    assert q.step == 1 / 256
    assert 0 < err <= 5 * q.step / 2
    assert q.dequantize(q.quantize(np.array([-3.0])))[0] == -3.0
    with pytest.raises(sa.SecAggCryptoError, match="clip_range"):
        q.quantize(np.array([8.5]))
    with pytest.raises(sa.SecAggCryptoError, match="NaN"):
        q.quantize(np.array([np.nan]))


def test_check_disjoint_never_reveals_both_secrets_of_a_site() -> None:
    with pytest.raises(sa.SecAggCryptoError, match="survivor and dropped"):
        sa.check_disjoint(["a", "b"], ["b"], {"a": 1, "b": 1})
    with pytest.raises(sa.SecAggCryptoError, match="did not share"):
        sa.check_disjoint(["a", "z"], [], {"a": 1, "b": 1})
    sa.check_disjoint(["a"], ["b"], {"a": 1, "b": 1})
