"""The site's side of secure aggregation: the coordinator only ever sees this site's update masked.

:class:`SiteSecAgg` holds one round's secrets and computes each stage's message without I/O;
:func:`secure_upload` drives the stages over ``SecAggService`` and uploads the masked input through the ordinary
signed, chunked ``UploadUpdate``. Protocol and threat model: :mod:`coordinator.privacy.secagg` (SecAgg, Bonawitz et al.
CCS 2017; SecAgg+, Bell et al. CCS 2020). Secrets stay in memory: a site that restarts mid-round is a dropout.

Other sites' keys are trusted only through their CA-signed certificates (checked here against the kit's CA), so
the coordinator cannot substitute keys. The masked input is ``quantize(n * delta, n)``: the example-weighted delta
and the weight itself, so the coordinator learns only the sums and divides them. Any clipping or DP noise happens
before this (the egress filters); quantisation refuses values beyond ``clip_range`` rather than clip them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import DecodeError

from fedcommon import certs, tensors
from fedcommon import secagg as sa
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb
from protos.fedbridge.v1 import secagg_service_pb2 as spb
from protos.fedbridge.v1 import secagg_service_pb2_grpc as spb_grpc

log = logging.getLogger(__name__)
POLL_MS = 10_000


class SecAggError(RuntimeError):
    """The site refuses to continue secure aggregation (the message says why); nothing more is revealed."""


def verify_roster_entry(entry: spb.RosterEntry, ca: x509.Certificate, federation_id: str, round: int,
                        signing_keys: dict[str, Ed25519PublicKey] | None = None, attempt: int = 0) -> spb.SecAggKeys:
    """Check a roster entry's certificate against the CA and its keys' signature; return the keys.

    The entry's certificate signing key is put in ``signing_keys`` (the consistency check verifies with it).
    """
    try:
        cert = x509.load_pem_x509_certificate(entry.certificate_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise SecAggError(f"roster entry {entry.site!r}: certificate is not issued by the federation CA ({e})") from None
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SecAggError(f"roster entry {entry.site!r}: certificate is not valid now")
    try:
        ident = certs.identity(cert)
    except certs.CertificateError as e:
        raise SecAggError(f"roster entry {entry.site!r}: {e}") from None
    if (ident.name, ident.role) != (entry.site, "site"):
        raise SecAggError(f"roster entry {entry.site!r}: certificate names another site or role")
    try:
        if ident.signing_key is None:
            raise InvalidSignature
        ident.signing_key.verify(entry.keys.signature, entry.keys.keys)
    except InvalidSignature:
        raise SecAggError(f"roster entry {entry.site!r}: keys are not signed by the site's certificate key") from None
    try:
        keys = spb.SecAggKeys.FromString(entry.keys.keys)
    except DecodeError:
        raise SecAggError(f"roster entry {entry.site!r}: keys are not a SecAggKeys message") from None
    if (keys.federation_id, keys.round, keys.site, keys.attempt) != (federation_id, round, entry.site, attempt):
        raise SecAggError(f"roster entry {entry.site!r}: keys are for another federation, round, attempt or site")
    if signing_keys is not None:
        signing_keys[entry.site] = ident.signing_key
    if len(keys.cipher_public_key) != 32 or len(keys.mask_public_key) != 32:
        raise SecAggError(f"roster entry {entry.site!r}: keys are not X25519 public keys")
    return keys


@dataclass
class SiteSecAgg:
    """One round of secure aggregation at one site (stage methods, no I/O)."""

    federation_id: str
    round: int
    site: str
    signing_key: Ed25519PrivateKey
    ca_pem: bytes
    cipher_key: bytes = field(default_factory=lambda: sa.private_bytes(sa.new_private_key()))
    mask_key: bytes = field(default_factory=lambda: sa.private_bytes(sa.new_private_key()))
    seed: bytes = field(default_factory=lambda: os.urandom(sa.SECRET_BYTES))
    roster: dict[str, spb.SecAggKeys] = field(default_factory=dict)
    params: spb.SecAggParams | None = None
    held: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # site -> (share of its s_sk, share of its b)
    attempt: int = 0
    signing_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)  # roster site -> its certificate's key
    sharers: set[str] = field(default_factory=set)  # other sites whose shares reached this site (masks pair with them)
    undecryptable: set[str] = field(default_factory=set)  # senders whose share to this site did not decrypt
    signed: tuple[str, ...] | None = None  # the survivor set this site signed (it signs one, once)

    def _keys(self) -> spb.SecAggKeys:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return spb.SecAggKeys(
            federation_id=self.federation_id, round=self.round, site=self.site, attempt=self.attempt,
            cipher_public_key=sa.public_bytes(X25519PrivateKey.from_private_bytes(self.cipher_key)),
            mask_public_key=sa.public_bytes(X25519PrivateKey.from_private_bytes(self.mask_key)))

    def advertise(self) -> spb.SignedSecAggKeys:
        """Stage 0: this round's public keys, signed with the key bound in this site's certificate."""
        raw = self._keys().SerializeToString(deterministic=True)
        return spb.SignedSecAggKeys(keys=raw, signature=self.signing_key.sign(raw))

    def share(self, entries: list[spb.RosterEntry], params: spb.SecAggParams,
              vector_length: int) -> list[spb.EncryptedShare]:
        """Stage 1: check the roster, then encrypt one share of (s_sk, b) for every other roster site."""
        ca = x509.load_pem_x509_certificate(self.ca_pem)
        roster = {e.site: verify_roster_entry(e, ca, self.federation_id, self.round, self.signing_keys, self.attempt)
                  for e in entries}
        if len(roster) != len(entries) or self.site not in roster:
            raise SecAggError("the roster lists a site twice or omits this site")
        if roster[self.site].SerializeToString(deterministic=True) != self._keys().SerializeToString(deterministic=True):
            raise SecAggError("the roster carries other keys for this site than it advertised")
        n, t = len(roster), params.threshold
        if not (2 <= t <= n and 2 * t > n):
            raise SecAggError(f"threshold {t} is unsafe for a roster of {n} (it must be > {n // 2} and <= {n})")
        if params.vector_length != vector_length:
            raise SecAggError(f"the coordinator expects {params.vector_length} elements, this adapter has {vector_length}")
        self.roster, self.params = roster, params
        xs = {s: i + 1 for i, s in enumerate(sorted(roster))}
        s_shares = sa.shamir_split(self.mask_key, t, list(xs.values()))
        b_shares = sa.shamir_split(self.seed, t, list(xs.values()))
        self.held[self.site] = (s_shares[xs[self.site]], b_shares[xs[self.site]])
        out = []
        for other in sorted(roster):
            if other == self.site:
                continue
            key = sa.agree(self.cipher_key, roster[other].cipher_public_key,
                           sa.cipher_context(self.federation_id, self.round))
            blob = sa.encrypt(key, s_shares[xs[other]] + b_shares[xs[other]],
                              sa.share_aad(self.federation_id, self.round, self.site, other))
            out.append(spb.EncryptedShare(site=other, ciphertext=blob))
        return out

    def mask(self, received: list[spb.EncryptedShare], delta: Mapping[str, torch.Tensor],
             spec_tensors: list[tuple[str, tuple[int, ...]]], weight: float) -> np.ndarray:
        """Stage 2: keep the shares sent to this site; return the masked, quantised weighted input (int64).

        A share that does not decrypt (or has the wrong size) is its sender's misbehaviour: it is logged and left
        out (this site cannot reveal it and says so), but the pairwise mask with that sender is still added, because
        the sender (and the coordinator's sum) pairs with this site either way.
        """
        assert self.params is not None, "share() first"
        for s in received:
            if s.site not in self.roster or s.site == self.site or s.site in self.sharers:
                log.warning("[Site.SecAgg] round=%d ignoring an unexpected or repeated share from %r", self.round,
                            s.site[:64])
                continue
            self.sharers.add(s.site)
            key = sa.agree(self.cipher_key, self.roster[s.site].cipher_public_key,
                           sa.cipher_context(self.federation_id, self.round))
            try:
                plain = sa.decrypt(key, s.ciphertext, sa.share_aad(self.federation_id, self.round, s.site, self.site))
                if len(plain) != 2 * sa.SHARE_BYTES:
                    raise sa.SecAggCryptoError("wrong size")
            except sa.SecAggCryptoError as e:
                self.undecryptable.add(s.site)
                log.warning("[Site.SecAgg] round=%d the share %r sent this site is unusable (%s); reporting it and "
                            "going on without it", self.round, s.site, e)
                continue
            self.held[s.site] = (plain[:sa.SHARE_BYTES], plain[sa.SHARE_BYTES:])
        if len(self.sharers) + 1 < self.params.threshold:
            raise SecAggError(f"only {len(self.held)} sites shared keys; the round needs {self.params.threshold}")
        quantizer = sa.Quantizer(self.params.clip_range, self.params.bits)
        try:
            y = quantizer.quantize(sa.flatten_weighted(delta, spec_tensors, weight))
        except sa.SecAggCryptoError as e:
            raise SecAggError(f"refusing to send: {e}") from None
        n = len(y)
        y = y + sa.prg(self.seed, n)
        for other in sorted(self.sharers):
            seed = sa.agree(self.mask_key, self.roster[other].mask_public_key,
                            sa.mask_context(self.federation_id, self.round))
            mask = sa.prg(seed, n)
            y = y + mask if sa.pairwise_sign(self.site, other) > 0 else y - mask
        return y.view(np.int64)

    def _check_sets(self, survivors: list[str], dropped: list[str]) -> None:
        try:
            sa.check_disjoint(survivors, dropped, {self.site, *self.sharers})
        except sa.SecAggCryptoError as e:
            raise SecAggError(str(e)) from None
        if self.site not in survivors:
            raise SecAggError("the coordinator lists this site as dropped although it sent its masked input")
        if set(survivors) | set(dropped) != {self.site, *self.sharers}:
            raise SecAggError("the survivor and dropped sets do not cover the sites that shared keys with this site")

    def sign_survivors(self, survivors: list[str], dropped: list[str], attempt: int) -> bytes:
        """Consistency check, step 1: sign (round, attempt, sorted survivors) once; refuses a second, other set."""
        self._check_sets(survivors, dropped)
        if attempt != self.attempt:
            raise SecAggError(f"the coordinator asks to sign attempt {attempt}; this site's keys are for {self.attempt}")
        names = tuple(sorted(survivors))
        if self.signed is not None and self.signed != names:
            raise SecAggError("the coordinator asks this site to sign a second, different survivor set")
        self.signed = names
        return self.signing_key.sign(sa.consistency_message(self.federation_id, self.round, attempt, names))

    def check_consistency(self, survivors: list[str], attempt: int, signatures: list[spb.SurvivorSignature]) -> None:
        """Consistency check, step 2: every signature verifies over the set this site signed, from distinct survivors,
        at least ``threshold`` of them; else the coordinator showed sites different sets and nothing is revealed."""
        assert self.params is not None, "share() first"
        if self.signed is None or tuple(sorted(survivors)) != self.signed or attempt != self.attempt:
            raise SecAggError("refusing to unmask: the survivor set or attempt differs from the one this site signed")
        message = sa.consistency_message(self.federation_id, self.round, attempt, self.signed)
        seen: set[str] = set()
        for sig in signatures:
            key = self.signing_keys.get(sig.site)
            if sig.site in seen or sig.site not in self.signed or key is None:
                raise SecAggError(f"refusing to unmask: a survivor signature from {sig.site[:64]!r} is repeated or not "
                                  "from a survivor")
            try:
                key.verify(sig.signature, message)
            except InvalidSignature:
                raise SecAggError(f"refusing to unmask: {sig.site!r}'s signature is not over the survivor set this "
                                  "site signed (the coordinator showed sites different sets)") from None
            seen.add(sig.site)
        if len(seen) < self.params.threshold:
            raise SecAggError(f"refusing to unmask: {len(seen)} survivor signatures, {self.params.threshold} needed")

    def reveal(self, survivors: list[str], dropped: list[str], attempt: int = 0,
               signatures: list[spb.SurvivorSignature] | None = None) -> list[spb.RevealedShare]:
        """Stage 3: shares of the survivors' seeds and the dropped sites' mask keys; never both for one site, and
        only after the consistency check passed (every signature over the same survivor set)."""
        self._check_sets(survivors, dropped)
        self.check_consistency(survivors, attempt, list(signatures or []))
        return ([spb.RevealedShare(site=s, kind=spb.SECRET_KIND_SELF_MASK_SEED, share=self.held[s][1])
                 for s in sorted(survivors) if s in self.held]
                + [spb.RevealedShare(site=d, kind=spb.SECRET_KIND_MASK_KEY, share=self.held[d][0])
                   for d in sorted(dropped) if d in self.held])


def spec_tensors_of(spec: pb.AdapterSpec) -> list[tuple[str, tuple[int, ...]]]:
    return [(t.name, tuple(t.shape)) for t in sorted(spec.tensors, key=lambda t: t.name)]


def fetch_settings(client) -> spb.GetSettingsResponse:  # type: ignore[no-untyped-def]
    """Ask the coordinator whether it aggregates securely (a coordinator without SecAggService: no).

    ``client`` is the agent's :class:`site_agent.client.CoordinatorClient`; a client without a gRPC channel (an
    in-process test double of the plain protocol) means no.
    """
    channel = getattr(client, "channel", None)
    if channel is None:
        return spb.GetSettingsResponse(enabled=False)
    try:
        return client._retry("GetSettings", lambda: spb_grpc.SecAggServiceStub(channel).GetSettings(
            spb.GetSettingsRequest(), timeout=30))
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
            return spb.GetSettingsResponse(enabled=False)
        raise


def _poll(what: str, call: Callable[[], object], attempt: int) -> object:
    """Poll until READY; None when this site is out (EXCLUDED, or the round moved on to another attempt)."""
    while True:
        resp = call()
        status = resp.status  # type: ignore[attr-defined]
        if resp.attempt != attempt:  # type: ignore[attr-defined]
            log.warning("[Site.SecAgg] the coordinator abandoned attempt %d (now %d): this site is out of it", attempt,
                        resp.attempt)  # type: ignore[attr-defined]
            return None
        if status == spb.SECAGG_STATUS_READY:
            return resp
        if status == spb.SECAGG_STATUS_EXCLUDED:
            return None
        log.debug("[Site.SecAgg] waiting for %s", what)
        time.sleep(0.05)


def secure_upload(client, task: pb.Task, site: str, signing_key: Ed25519PrivateKey, ca_pem: bytes,  # type: ignore[no-untyped-def]
                  delta: Mapping[str, torch.Tensor], num_examples: int, epsilon: float = 0.0,
                  dp_delta: float = 0.0) -> tuple[pb.UpdateEnvelope, bytes] | None:
    """Run the SecAgg stages for ``task.round`` and upload the masked input with ``client``.

    Returns the uploaded envelope and payload, or None when the coordinator left this site out of the round
    (late to the roster, or dropped): then nothing about the update left the site.
    """
    try:
        return _run_stages(client, task, site, signing_key, ca_pem, delta, num_examples, epsilon, dp_delta)
    except (SecAggError, sa.SecAggCryptoError) as e:
        # What the coordinator or another site sent does not hold up: refuse this round, reveal nothing more, carry on.
        log.warning("[Site.SecAgg] round=%d site=%s refusing this round's secure aggregation: %s", task.round, site, e)
        return None
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
            raise
        # The round moved on without this site (roster closed, stage over, round closed): it is out of this round.
        log.warning("[Site.SecAgg] round=%d site=%s left out of the round: %s", task.round, site,
                    e.details())  # type: ignore[attr-defined]
        return None


def _run_stages(client, task: pb.Task, site: str, signing_key: Ed25519PrivateKey, ca_pem: bytes,  # type: ignore[no-untyped-def]
                delta: Mapping[str, torch.Tensor], num_examples: int, epsilon: float,
                dp_delta: float) -> tuple[pb.UpdateEnvelope, bytes] | None:
    stub = spb_grpc.SecAggServiceStub(client.channel)
    r, fed = task.round, task.federation_id
    # The current attempt first (a WAIT answer carries it): this site's keys and survivor signature bind it.
    now = client._retry("GetRoster", lambda: stub.GetRoster(spb.GetRosterRequest(round=r, wait_ms=0), timeout=30))
    if now.status == spb.SECAGG_STATUS_EXCLUDED:
        return None
    me = SiteSecAgg(fed, r, site, signing_key, ca_pem, attempt=now.attempt)
    spec_tensors = spec_tensors_of(task.adapter_spec)
    client._retry("AdvertiseKeys", lambda: stub.AdvertiseKeys(
        spb.AdvertiseKeysRequest(round=r, keys=me.advertise()), timeout=30))
    roster = _poll("roster", lambda: client._retry("GetRoster", lambda: stub.GetRoster(
        spb.GetRosterRequest(round=r, wait_ms=POLL_MS), timeout=POLL_MS / 1000 + 30)), me.attempt)
    if roster is None:
        return None
    shares = me.share(list(roster.entries), roster.params, sa.vector_length(spec_tensors))  # type: ignore[attr-defined]
    client._retry("ShareKeys", lambda: stub.ShareKeys(spb.ShareKeysRequest(round=r, shares=shares), timeout=30))
    got = _poll("shares", lambda: client._retry("GetShares", lambda: stub.GetShares(
        spb.GetSharesRequest(round=r, wait_ms=POLL_MS), timeout=POLL_MS / 1000 + 30)), me.attempt)
    if got is None:
        return None
    masked = me.mask(list(got.shares), delta, spec_tensors, float(num_examples))  # type: ignore[attr-defined]
    payload = tensors.encode_state({sa.MASKED_KEY: torch.from_numpy(masked)})
    # The weight travels masked inside the payload, so the envelope states 1 example (it must be > 0).
    env = codec.make_envelope(federation_id=fed, round=r, site=site, base_model_sha256=task.base_model_sha256,
                              payload=payload, adapter_spec_sha256=task.adapter_spec.sha256, num_examples=1,
                              epsilon_spent=epsilon)
    env.dp_delta = dp_delta  # the site's DP accounting travels signed, as without secure aggregation
    client.upload(codec.sign_envelope(env, signing_key), env, payload)
    try:  # the masked input is in; a missed unmasking stage only means the others unmask without this site
        req = _poll("unmask request", lambda: client._retry("GetUnmaskRequest", lambda: stub.GetUnmaskRequest(
            spb.GetUnmaskRequestRequest(round=r, wait_ms=POLL_MS), timeout=POLL_MS / 1000 + 30)), me.attempt)
        if req is not None:
            survivors, dropped = list(req.survivors), list(req.dropped)  # type: ignore[attr-defined]
            sig = me.sign_survivors(survivors, dropped, req.attempt)  # type: ignore[attr-defined]
            client._retry("SignSurvivors", lambda: stub.SignSurvivors(
                spb.SignSurvivorsRequest(round=r, attempt=me.attempt, signature=sig), timeout=30))
            sigs = _poll("survivor signatures", lambda: client._retry("GetSurvivorSignatures",
                         lambda: stub.GetSurvivorSignatures(spb.GetSurvivorSignaturesRequest(round=r, wait_ms=POLL_MS),
                                                            timeout=POLL_MS / 1000 + 30)), me.attempt)
            if sigs is not None:
                reveals = me.reveal(list(sigs.survivors), dropped, sigs.attempt,  # type: ignore[attr-defined]
                                    list(sigs.signatures))  # type: ignore[attr-defined]
                client._retry("UnmaskShares", lambda: stub.UnmaskShares(spb.UnmaskSharesRequest(
                    round=r, shares=reveals, undecryptable=sorted(me.undecryptable)), timeout=30))
    except SecAggError as e:  # the masked input is in; this site reveals nothing for a coordinator it cannot trust
        log.warning("[Site.SecAgg] round=%d site=%s refusing to unmask: %s", r, site, e)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
            raise
        log.warning("[Site.SecAgg] round=%d site=%s unmasking went on without this site: %s", r, site,
                    e.details())  # type: ignore[attr-defined]
    log.info("[Site.SecAgg] round=%d site=%s masked input sent and unmasking shares revealed", r, site)
    return env, payload
