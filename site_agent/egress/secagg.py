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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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


def verify_roster_entry(entry: spb.RosterEntry, ca: x509.Certificate, federation_id: str, round: int) -> spb.SecAggKeys:
    """Check a roster entry's certificate against the CA and its keys' signature; return the keys."""
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
    keys = spb.SecAggKeys.FromString(entry.keys.keys)
    if (keys.federation_id, keys.round, keys.site) != (federation_id, round, entry.site):
        raise SecAggError(f"roster entry {entry.site!r}: keys are for another federation, round or site")
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

    def _keys(self) -> spb.SecAggKeys:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        return spb.SecAggKeys(
            federation_id=self.federation_id, round=self.round, site=self.site,
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
        roster = {e.site: verify_roster_entry(e, ca, self.federation_id, self.round) for e in entries}
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
        """Stage 2: keep the shares sent to this site; return the masked, quantised weighted input (int64)."""
        assert self.params is not None, "share() first"
        for s in received:
            if s.site not in self.roster or s.site == self.site or s.site in self.held:
                raise SecAggError(f"unexpected share from {s.site!r}")
            key = sa.agree(self.cipher_key, self.roster[s.site].cipher_public_key,
                           sa.cipher_context(self.federation_id, self.round))
            plain = sa.decrypt(key, s.ciphertext, sa.share_aad(self.federation_id, self.round, s.site, self.site))
            if len(plain) != 2 * sa.SHARE_BYTES:
                raise SecAggError(f"share from {s.site!r} has the wrong size")
            self.held[s.site] = (plain[:sa.SHARE_BYTES], plain[sa.SHARE_BYTES:])
        if len(self.held) < self.params.threshold:
            raise SecAggError(f"only {len(self.held)} sites shared keys; the round needs {self.params.threshold}")
        quantizer = sa.Quantizer(self.params.clip_range, self.params.bits)
        try:
            y = quantizer.quantize(sa.flatten_weighted(delta, spec_tensors, weight))
        except sa.SecAggCryptoError as e:
            raise SecAggError(f"refusing to send: {e}") from None
        n = len(y)
        y = y + sa.prg(self.seed, n)
        for other in self.held:
            if other == self.site:
                continue
            seed = sa.agree(self.mask_key, self.roster[other].mask_public_key,
                            sa.mask_context(self.federation_id, self.round))
            mask = sa.prg(seed, n)
            y = y + mask if sa.pairwise_sign(self.site, other) > 0 else y - mask
        return y.view(np.int64)

    def reveal(self, survivors: list[str], dropped: list[str]) -> list[spb.RevealedShare]:
        """Stage 3: shares of the survivors' seeds and the dropped sites' mask keys; never both for one site."""
        try:
            sa.check_disjoint(survivors, dropped, self.held)
        except sa.SecAggCryptoError as e:
            raise SecAggError(str(e)) from None
        if self.site not in survivors:
            raise SecAggError("the coordinator lists this site as dropped although it sent its masked input")
        return ([spb.RevealedShare(site=s, kind=spb.SECRET_KIND_SELF_MASK_SEED, share=self.held[s][1])
                 for s in sorted(survivors)]
                + [spb.RevealedShare(site=d, kind=spb.SECRET_KIND_MASK_KEY, share=self.held[d][0])
                   for d in sorted(dropped)])


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


def _poll(what: str, call: Callable[[], object]) -> object:
    while True:
        resp = call()
        status = resp.status  # type: ignore[attr-defined]
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
    me = SiteSecAgg(fed, r, site, signing_key, ca_pem)
    spec_tensors = spec_tensors_of(task.adapter_spec)
    client._retry("AdvertiseKeys", lambda: stub.AdvertiseKeys(
        spb.AdvertiseKeysRequest(round=r, keys=me.advertise()), timeout=30))
    roster = _poll("roster", lambda: client._retry("GetRoster", lambda: stub.GetRoster(
        spb.GetRosterRequest(round=r, wait_ms=POLL_MS), timeout=POLL_MS / 1000 + 30)))
    if roster is None:
        return None
    shares = me.share(list(roster.entries), roster.params, sa.vector_length(spec_tensors))  # type: ignore[attr-defined]
    client._retry("ShareKeys", lambda: stub.ShareKeys(spb.ShareKeysRequest(round=r, shares=shares), timeout=30))
    got = _poll("shares", lambda: client._retry("GetShares", lambda: stub.GetShares(
        spb.GetSharesRequest(round=r, wait_ms=POLL_MS), timeout=POLL_MS / 1000 + 30)))
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
            spb.GetUnmaskRequestRequest(round=r, wait_ms=POLL_MS), timeout=POLL_MS / 1000 + 30)))
        if req is not None:
            reveals = me.reveal(list(req.survivors), list(req.dropped))  # type: ignore[attr-defined]
            client._retry("UnmaskShares", lambda: stub.UnmaskShares(
                spb.UnmaskSharesRequest(round=r, shares=reveals), timeout=30))
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
            raise
        log.warning("[Site.SecAgg] round=%d site=%s unmasking went on without this site: %s", r, site,
                    e.details())  # type: ignore[attr-defined]
    log.info("[Site.SecAgg] round=%d site=%s masked input sent and unmasking shares revealed", r, site)
    return env, payload
