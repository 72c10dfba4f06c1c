"""Secure-aggregation primitives shared by sites and the coordinator, built on ``cryptography`` only.

SecAgg (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017) and its
SecAgg+ refinement (Bell et al., CCS 2020): each site adds a self mask PRG(b_u) and, for every other site v, a pairwise
mask +/-PRG(s_uv) to its quantised input; pairwise masks cancel in the sum, and Shamir shares of b_u and of the
pairwise private key let the survivors remove the masks of sites that dropped out.

Why not ``flwr.common.secure_aggregation``: its Shamir sharing needs pycryptodome and its PRG is numpy's Mersenne
Twister (not a cryptographic generator), and Flower is only a dev/test dependency here. These ~150 lines use the
project's one crypto library: X25519 + HKDF-SHA256 (key agreement), AES-256-GCM (share encryption), AES-256-CTR
(the mask PRG), and Shamir sharing over the prime field GF(2^521 - 1).

All arithmetic on masked vectors is on unsigned 64-bit integers, i.e. modulo 2^64 (numpy wraps on overflow).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PRIME = 2**521 - 1  # Mersenne prime > 2^256: one field element holds a 32-byte secret
SECRET_BYTES = 32
SHARE_BYTES = 2 + (PRIME.bit_length() + 7) // 8  # 2-byte x coordinate + y
NONCE_BYTES = 12
# The one tensor of a masked input's payload: the site encodes it under this name and the coordinator accepts only it.
MASKED_KEY = "secagg.masked"


class SecAggCryptoError(ValueError):
    """A share, ciphertext or quantisation input is malformed or cannot be used."""


# -- Shamir secret sharing over GF(PRIME) --------------------------------------------------------------------------
def shamir_split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Split ``secret`` into one share per x coordinate in ``xs``; any ``threshold`` of them reconstruct it.

    Raises:
        SecAggCryptoError: threshold outside 1..len(xs), a bad x coordinate, or a secret of the wrong size.
    """
    if len(secret) != SECRET_BYTES:
        raise SecAggCryptoError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise SecAggCryptoError(f"threshold {threshold} outside 1..{len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < 1 << 16 for x in xs):
        raise SecAggCryptoError("share x coordinates must be distinct integers in 1..65535")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = x.to_bytes(2, "big") + y.to_bytes(SHARE_BYTES - 2, "big")
    return out


def share_x(share: bytes) -> int:
    if len(share) != SHARE_BYTES:
        raise SecAggCryptoError(f"a share is {SHARE_BYTES} bytes, got {len(share)}")
    return int.from_bytes(share[:2], "big")


def shamir_combine(shares: Sequence[bytes], threshold: int) -> bytes:
    """Reconstruct a secret from at least ``threshold`` shares (Lagrange interpolation at 0).

    Raises:
        SecAggCryptoError: Fewer than ``threshold`` distinct shares, or a malformed share.
    """
    points: dict[int, int] = {}
    for s in shares:
        points.setdefault(share_x(s), int.from_bytes(s[2:], "big"))
    if len(points) < threshold:
        raise SecAggCryptoError(f"{len(points)} distinct shares, {threshold} needed to reconstruct")
    use = sorted(points.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(use):
        num, den = 1, 1
        for j, (xj, _) in enumerate(use):
            if i != j:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise SecAggCryptoError("shares do not reconstruct a secret of the expected size (inconsistent shares)")
    return secret.to_bytes(SECRET_BYTES, "big")


def shamir_consistent(shares: Sequence[bytes], threshold: int) -> bool:
    """Whether every share lies on the one polynomial the first ``threshold`` distinct shares define.

    With more than ``threshold`` shares of one secret this detects a dealer that handed out shares of no single
    secret (or a revealer that altered one); with exactly ``threshold`` it cannot, and returns True.

    Raises:
        SecAggCryptoError: A malformed share, or fewer than ``threshold`` distinct shares.
    """
    points: dict[int, int] = {}
    for s in shares:
        x, y = share_x(s), int.from_bytes(s[2:], "big")
        if points.setdefault(x, y) != y:
            return False  # two different shares at one x coordinate
    if len(points) < threshold:
        raise SecAggCryptoError(f"{len(points)} distinct shares, {threshold} needed to reconstruct")
    base = sorted(points.items())[:threshold]
    for x, y in sorted(points.items())[threshold:]:
        acc = 0
        for i, (xi, yi) in enumerate(base):
            num, den = 1, 1
            for j, (xj, _) in enumerate(base):
                if i != j:
                    num = num * (x - xj) % PRIME
                    den = den * (xi - xj) % PRIME
            acc = (acc + yi * num * pow(den, -1, PRIME)) % PRIME
        if acc != y:
            return False
    return True


def consistency_message(federation_id: str, round: int, attempt: int, survivors: Sequence[str]) -> bytes:
    """What each survivor signs in the consistency check (Bonawitz et al. CCS 2017, ConsistencyCheck round).

    The round, its attempt and the sorted survivor set: a signature shown to a site proves its signer was shown
    the same set in the same attempt, so the coordinator cannot give different sites different survivor sets.
    """
    names = sorted(survivors)
    if len(set(names)) != len(names) or any(not n or "\n" in n for n in names):
        raise SecAggCryptoError("a survivor set lists a site twice or an invalid site name")
    return "\n".join(["fedbridge-secagg/v1|consistency", federation_id, str(int(round)), str(int(attempt)),
                      *names]).encode()


# -- keys, agreement, encryption, PRG ------------------------------------------------------------------------------
def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def public_bytes(key: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private: X25519PrivateKey | bytes, peer_public: bytes, context: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 over the X25519 shared secret, bound to ``context``."""
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:
        raise SecAggCryptoError(f"bad X25519 public key: {e}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedbridge-secagg/v1|" + context).derive(shared)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise SecAggCryptoError("encrypted share does not decrypt (wrong key, sender or tampered)") from None


def prg(seed: bytes, n: int) -> np.ndarray:
    """``n`` pseudo-random uint64 values from a 32-byte seed (AES-256-CTR keystream; each seed masks one vector)."""
    if len(seed) != 32:
        raise SecAggCryptoError(f"PRG seed must be 32 bytes, got {len(seed)}")
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(enc.update(b"\0" * (8 * n)) + enc.finalize(), dtype="<u8").copy()


def mask_context(federation_id: str, round: int) -> bytes:
    """HKDF context of the pairwise mask seeds of ``round``."""
    return f"{federation_id}|{round}|mask".encode()


def cipher_context(federation_id: str, round: int) -> bytes:
    """HKDF context of the keys that encrypt shares in ``round``."""
    return f"{federation_id}|{round}|cipher".encode()


def share_aad(federation_id: str, round: int, sender: str, recipient: str) -> bytes:
    """Associated data of an encrypted share: a ciphertext only opens for its round, sender and recipient."""
    return f"{federation_id}|{round}|{sender}|{recipient}".encode()


def pairwise_sign(me: str, other: str) -> int:
    """+1 if ``me`` adds PRG(s_uv), -1 if it subtracts it (by site-name order, so the pair cancels)."""
    return 1 if me < other else -1


# -- quantisation ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quantizer:
    """Fixed point with step ``clip_range / 2^(bits-1)``, two's complement in uint64 so sums wrap modulo 2^64.

    Deterministic round-to-nearest: each element of each site's input is off by at most ``step / 2``, so a sum of N
    inputs is off by at most ``N * step / 2`` per element. The exact integer sum is recovered as long as
    ``N * 2^(bits-1) < 2^63``.
    """

    clip_range: float
    bits: int

    @property
    def step(self) -> float:
        return self.clip_range / 2 ** (self.bits - 1)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float vector -> uint64 fixed point. Refuses (never clips) values outside ``[-clip_range, clip_range]``."""
        x = np.asarray(x, dtype=np.float64)
        if not np.isfinite(x).all():
            raise SecAggCryptoError("input holds NaN or Inf")
        worst = float(np.abs(x).max(initial=0.0))
        if worst > self.clip_range:
            raise SecAggCryptoError(f"an input element has |value| {worst:.4g} > clip_range {self.clip_range:.4g}; "
                                    "raise secure_aggregation.clip_range")
        return np.rint(x / self.step).astype(np.int64).view(np.uint64)

    def dequantize(self, total: np.ndarray) -> np.ndarray:
        """A uint64 sum of quantised inputs -> float64 (read as a signed 64-bit integer)."""
        return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) * self.step


def check_disjoint(survivors: Sequence[str], dropped: Sequence[str], sharers: Mapping[str, object]) -> None:
    """A site's guard before it reveals anything: never both secrets of one site, only for sites that shared."""
    both = set(survivors) & set(dropped)
    if both:
        raise SecAggCryptoError(f"refusing to unmask: {sorted(both)[0]!r} is listed as survivor and dropped")
    unknown = (set(survivors) | set(dropped)) - set(sharers)
    if unknown:
        raise SecAggCryptoError(f"refusing to unmask: {sorted(unknown)[0]!r} did not share keys with this site")


# -- adapter state <-> flat vector ------------------------------------------------------------------------------------
def vector_length(spec_tensors: Sequence[tuple[str, Sequence[int]]]) -> int:
    """Elements of the masked vector: every adapter parameter, plus one for the weight."""
    return sum(int(np.prod(shape, dtype=np.int64)) for _, shape in spec_tensors) + 1


def flatten_weighted(state: Mapping[str, torch.Tensor], spec_tensors: Sequence[tuple[str, Sequence[int]]],
                     weight: float) -> np.ndarray:
    """``weight * state`` flattened in spec order, then ``weight`` itself as the last element (float64)."""
    parts = [state[name].detach().to(torch.float64).reshape(-1).numpy() * weight for name, _ in spec_tensors]
    return np.concatenate([*parts, np.array([weight], dtype=np.float64)])


def unflatten(vec: np.ndarray, spec_tensors: Sequence[tuple[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flatten_weighted` without the weight element (float32 tensors)."""
    out, i = {}, 0
    for name, shape in spec_tensors:
        n = int(np.prod(shape, dtype=np.int64))
        out[name] = torch.from_numpy(np.ascontiguousarray(vec[i:i + n])).to(torch.float32).reshape(tuple(shape))
        i += n
    return out
