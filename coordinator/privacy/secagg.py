"""The coordinator's side of secure aggregation: route keys and shares, then unmask only the round's sum.

Protocol (SecAgg, Bonawitz et al. CCS 2017, §4; SecAgg+ Bell et al. CCS 2020), one instance per round:

1. ``advertise``: each site sends two X25519 public keys signed with its certificate's Ed25519 key. The roster
   closes when every joined site advertised, or at the stage deadline with enough sites.
2. ``share``: each roster site sends Shamir shares of its self-mask seed b_u and of its mask private key s_sk_u,
   each encrypted for one other roster site; the coordinator stores and routes ciphertexts it cannot read.
3. ``masked``: each site that shared uploads ``quantize(n_u * delta_u, n_u) + PRG(b_u) +/- PRG(s_uv)`` through
   FederationService.UploadUpdate (signed envelope, chunked, resumable; envelope num_examples is 1 because the
   weight travels masked). Sites that shared but sent no masked input by the deadline are *dropped*.
4. ``unmask``: survivors reveal shares of every survivor's b and of every dropped site's s_sk (never both of one
   site). With ``threshold`` shares each the coordinator removes the self masks and the dropped sites' dangling
   pairwise masks; survivors' pairwise masks cancel in the sum.

Every stage's state lives in the store (``secagg_*`` tables, masked inputs in ``updates``), so a restarted
coordinator resumes mid-protocol. What the store keeps: public keys, member sets, masked inputs (never an unmasked
individual update); routed and revealed shares are deleted once the round closed.

3b. ``consistency`` (Bonawitz et al. §4, active security): each survivor signs (round, attempt, sorted survivors)
   with its certificate's Ed25519 key; every signer gets all signatures and reveals nothing unless each verifies
   over the set it signed. The coordinator cannot show different survivor sets to different sites.

Every call passes the engine's access gate (servicer); revoked sites are never expected. Each stage has a deadline
(``stage_timeout_s``); below the threshold the attempt is abandoned and the round's SecAgg restarts as the next
attempt without the missing sites (keys, shares and masked inputs of the old attempt are deleted in one
transaction). The unmasking is computed once before the stage closes: shares that do not fit a dealer's keys drop
that dealer (audited) and retry, so a round marked closing can always be aggregated after a restart.

Threat model and limits: keys are signed, so the coordinator cannot substitute them; the effective threshold is
always more than half of the roster, so no two disjoint groups of honest sites can hand it both secrets of one
site. A revealer that alters a share is blamed on the share's dealer (shares carry no dealer signature).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from coordinator.config import SecureAggregationSpec
from coordinator.errors import InvalidUpdate, PermissionDenied, WrongRound
from coordinator.rounds.store import Store, UpdateRow
from coordinator.trust.pki import PeerIdentity
from fedcommon import secagg as sa
from fedcommon import tensors
from fedcommon.secagg import MASKED_KEY
from protos import codec
from protos.fedbridge.v1 import secagg_service_pb2 as spb

log = logging.getLogger(__name__)
STAGES = ("advertise", "share", "masked", "consistency", "unmask", "done")
SEED, MASK_KEY = "seed", "mask_key"
MAX_CIPHERTEXT = 1024


@dataclass(frozen=True)
class Aggregate:
    """The unmasked result of a round: the weighted mean delta and what produced it."""

    mean_delta: dict[str, torch.Tensor]
    total_weight: int
    info: dict[str, Any]


class Misbehaviour(InvalidUpdate):
    """The revealed shares of some sites do not fit their advertised keys (``culprits``), or the sum is garbage."""

    def __init__(self, message: str, culprits: list[str]) -> None:
        super().__init__(message)
        self.culprits = culprits


def _members(st: dict[str, Any], key: str) -> list[str]:
    return list(st["members"].get(key, []))


def attempt_of(st: dict[str, Any]) -> int:
    return int(st["members"].get("attempt", 0))


class SecAggCoordinator:
    """Runs the SecAgg stages of each round on top of the store.

    Args:
        spec: The federation's secure-aggregation settings.
        store: Durable state.
        federation_id: Bound into every signed key set and derived key.
        spec_tensors: ``(name, shape)`` of the adapter in spec order (sorted names).
        min_sites: The federation's quorum (a roster needs at least this many sites).
        on_ready: Called (on the event loop) when a round's unmasking stage completed (or the round failed).
        clock: Seconds since the epoch (tests pass a fake one).
        revoked: The names of revoked sites now (the engine's access gate); they are never waited for.
        audit: Appends an audit record (the engine's ``_audit``).
    """

    def __init__(self, spec: SecureAggregationSpec, store: Store, federation_id: str,
                 spec_tensors: list[tuple[str, tuple[int, ...]]], min_sites: int,
                 on_ready: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.time,
                 revoked: Callable[[], Collection[str]] = lambda: (),
                 audit: Callable[[str, dict[str, Any]], None] = lambda event, detail: None) -> None:
        self.spec = spec
        self.store = store
        self.federation_id = federation_id
        self.spec_tensors = spec_tensors
        self.length = sa.vector_length(spec_tensors)
        self.min_sites = min_sites
        self.on_ready = on_ready
        self.clock = clock
        self.revoked = revoked
        self.audit = audit
        self.quantizer = sa.Quantizer(spec.clip_range, spec.bits)
        self._changed = asyncio.Event()
        self._warned: set[tuple[int, int, str]] = set()

    # -- stage bookkeeping ----------------------------------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _timeout_ms(self, stage: str) -> int:
        return int(self.spec.timeout_for(stage) * 1000)

    def _state(self, round: int) -> dict[str, Any]:
        st = self.store.secagg_round(round)
        if st is None:
            st = {"stage": "advertise", "deadline_ms": self._now_ms() + self._timeout_ms("advertise"),
                  "threshold": self.spec.threshold, "members": {}}
            self.store.secagg_set_round(round, st["stage"], st["deadline_ms"], st["threshold"], st["members"])
        return st

    def _current(self, round: int) -> dict[str, Any]:
        cur = self.store.current_round()
        if cur is None or cur.state != "open" or cur.round != round:
            now = f"round {cur.round} is {cur.state}" if cur else "no round is open"
            raise WrongRound(f"secure aggregation of round {round} is not running; {now}")
        st = self._state(round)
        if st["stage"] == "failed":
            raise WrongRound(f"secure aggregation of round {round} failed: {st['members'].get('failure', '')}")
        return st

    def _require(self, st: dict[str, Any], stage: str, round: int) -> None:
        if st["stage"] != stage:
            raise WrongRound(f"round {round} secure aggregation is in stage {st['stage']!r}, not {stage!r}")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _present(self, round: int, stage: str, st: dict[str, Any]) -> list[str]:
        """Who completed ``stage`` so far (a revoked site's contribution to an open stage does not count)."""
        revoked = set(self.revoked())
        if stage == "advertise":
            out = [k[0] for k in self.store.secagg_keys(round)]
        elif stage == "share":
            out = sorted({f for f, _, _ in self.store.secagg_shares(round)})
        elif stage == "masked":
            sharers = set(_members(st, "sharers"))
            out = [u.site for u in self.store.updates(round) if u.site in sharers]
        elif stage == "consistency":
            return sorted(st["members"].get("signatures", {}))
        else:
            return sorted({f for f, _, _, _ in self.store.secagg_reveals(round)})
        return sorted(set(out) - revoked)

    def _expected(self, round: int, stage: str, st: dict[str, Any]) -> set[str]:
        """Whom ``stage`` waits for: never a revoked site, nor (at the roster) one left out of this attempt."""
        if stage == "advertise":
            base = {s["name"] for s in self.store.sites()} - set(_members(st, "excluded"))
        else:
            base = set(_members(st, {"share": "roster", "masked": "sharers", "consistency": "survivors",
                                     "unmask": "signers"}[stage]))
        return base - set(self.revoked())

    def needed(self, stage: str, st: dict[str, Any]) -> int:
        return max(self.min_sites, self.spec.threshold) if stage == "advertise" else int(st["threshold"])

    def tick(self, round: int) -> bool:
        """Close every stage of ``round`` that is complete or past its deadline with enough sites; abandon the
        attempt of a stage past its deadline below the threshold (the next attempt goes on without the missing
        sites), and an unmasking whose shares do not fit the keys (without the sites that dealt them).

        Returns True when the round's unmasking completed (or the round failed) during this call.
        """
        cur = self.store.current_round()
        if cur is None or cur.round != round or cur.state != "open":
            return False
        st = self._state(round)
        moved = False
        while st["stage"] not in ("done", "failed"):
            stage = st["stage"]
            present = self._present(round, stage, st)
            expected = self._expected(round, stage, st)
            needed = self.needed(stage, st)
            complete = expected <= set(present)
            late = self._now_ms() >= st["deadline_ms"]
            if not (complete or late):
                break
            if len(present) < needed:
                if not late:
                    break  # complete, but too few: more sites may still join (advertise) until the deadline
                if stage == "advertise":
                    # Nobody has shared a secret yet and the others may still be training (after an abandoned
                    # attempt they train again): the roster keeps waiting for enough sites; no one is excluded.
                    if (round, attempt_of(st), stage) not in self._warned:
                        self._warned.add((round, attempt_of(st), stage))
                        log.warning("[SecAgg.tick] round=%d roster has %d of the %d sites it needs past its deadline; "
                                    "waiting", round, len(present), needed)
                    break
                st = self._abandon(round, st, f"stage {stage!r} reached its deadline with {len(present)} of the "
                                   f"{needed} sites it needs", sorted(expected - set(present)), [])
                moved = True
                continue
            if stage == "unmask":
                try:
                    self._unmask(round, st, revealers=present)
                except Misbehaviour as e:
                    st = self._abandon(round, st, str(e), [], e.culprits)
                    moved = True
                    continue
            self._close_stage(round, st, stage, present)
            moved = True
        if moved:
            self._notify()
        return moved and st["stage"] in ("done", "failed")

    def _abandon(self, round: int, st: dict[str, Any], reason: str, missing: list[str],
                 culprits: list[str]) -> dict[str, Any]:
        """Give up this attempt (audited with who was missing or misbehaved) and start the next one without them;
        fail the round when too few sites remain or attempts run out. One transaction: a restart sees either."""
        attempt = attempt_of(st)
        excluded = sorted(set(_members(st, "excluded")) | set(missing) | set(culprits))
        candidates = {s["name"] for s in self.store.sites()} - set(excluded) - set(self.revoked())
        needed = self.needed("advertise", st)
        detail = {"round": round, "attempt": attempt, "stage": st["stage"], "reason": reason[:500],
                  "missing": missing, "misbehaving": culprits, "excluded_next": excluded}
        for site in culprits:
            self.audit("secagg_participant_dropped", {"round": round, "attempt": attempt, "site": site,
                                                       "reason": reason[:500]})
        if len(candidates) < needed or attempt + 1 >= self.spec.max_attempts:
            why = (f"only {len(candidates)} site(s) remain without the missing or misbehaving ones, {needed} needed"
                   if len(candidates) < needed else f"{attempt + 1} attempt(s) failed (secure_aggregation.max_attempts)")
            new = {"stage": "failed", "deadline_ms": self._now_ms(), "threshold": st["threshold"],
                   "members": {**st["members"], "failure": f"{reason}; {why}"}}
            self.store.secagg_set_round(round, new["stage"], new["deadline_ms"], new["threshold"], new["members"])
            self.audit("secagg_round_failed", {**detail, "why": why})
            log.error("[SecAgg.tick] round=%d attempt=%d failed: %s; %s", round, attempt, reason, why)
            return new
        new = {"stage": "advertise", "deadline_ms": self._now_ms() + self._timeout_ms("advertise"),
               "threshold": self.spec.threshold, "members": {"attempt": attempt + 1, "excluded": excluded}}
        self.store.secagg_restart(round, new["stage"], new["deadline_ms"], new["threshold"], new["members"])
        self.audit("secagg_attempt_abandoned", {**detail, "next_attempt": attempt + 1})
        log.warning("[SecAgg.tick] round=%d attempt=%d abandoned (%s); retrying as attempt %d without %s", round,
                    attempt, reason, attempt + 1, excluded or "nobody")
        return new

    def failure(self, round: int) -> str | None:
        """Why secure aggregation of ``round`` failed, or None."""
        st = self.store.secagg_round(round)
        return str(st["members"].get("failure", "")) if st is not None and st["stage"] == "failed" else None

    def _close_stage(self, round: int, st: dict[str, Any], stage: str, present: list[str]) -> None:
        members = st["members"]
        if stage == "advertise":
            members["roster"] = sorted(present)
            st["threshold"] = max(self.spec.threshold, len(present) // 2 + 1)
        elif stage == "share":
            members["sharers"] = sorted(present)
        elif stage == "masked":
            members["survivors"] = sorted(present)
            members["dropped"] = sorted(set(members["sharers"]) - set(present))
        elif stage == "consistency":
            members["signers"] = sorted(present)
        else:
            members["revealers"] = sorted(present)
        st["stage"] = STAGES[STAGES.index(stage) + 1]
        st["deadline_ms"] = self._now_ms() + (self._timeout_ms(st["stage"]) if st["stage"] != "done" else 0)
        self.store.secagg_set_round(round, st["stage"], st["deadline_ms"], st["threshold"], members)
        log.info("[SecAgg.%s] round=%d attempt=%d closed with %d sites (threshold=%d)%s", stage, round, attempt_of(st),
                 len(present), st["threshold"],
                 f" dropped={members['dropped']}" if stage == "masked" and members["dropped"] else "")

    def _peek(self, round: int) -> dict[str, Any]:
        """The state of ``round`` for a read: the current open round (created on first use) or one that ran."""
        if not 0 < round < 1 << 63:  # the wire allows any uint64; SQLite keys stop at 2^63 - 1
            raise WrongRound(f"secure aggregation of round {round} is not running (no such round)")
        st = self.store.secagg_round(round)
        return st if st is not None else self._current(round)

    def roster_closed(self, round: int, site: str | None = None) -> bool:
        """The roster of ``round`` is fixed (or ``site`` is left out of this attempt, or the round failed): a site
        that has not joined the protocol yet waits for the next round."""
        st = self.store.secagg_round(round)
        if st is None:
            return False
        return st["stage"] != "advertise" or (site is not None and site in _members(st, "excluded"))

    def ready(self, round: int) -> bool:
        st = self.store.secagg_round(round)
        return st is not None and st["stage"] == "done"

    async def wait(self, ready: Callable[[], bool], wait_s: float) -> None:
        """Long-poll helper: return when ``ready()`` or after ``wait_s`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_s)
        while not ready() and (remaining := deadline - loop.time()) > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))

    async def run_ticker(self, period_s: float = 0.5) -> None:
        """Close stages at their deadlines even when no site calls (run as a background task)."""
        while True:
            await asyncio.sleep(period_s)
            cur = self.store.current_round()
            if cur is not None and cur.state == "open" and self.tick(cur.round):
                self.on_ready()

    def attempt(self, round: int) -> int:
        """The current SecAgg attempt of ``round`` (0 before the round's state exists)."""
        st = self.store.secagg_round(round)
        return attempt_of(st) if st is not None else 0

    # -- stage 0: advertise keys ----------------------------------------------------------------------------------
    def advertise(self, peer: PeerIdentity, cert_pem: bytes, round: int, keys: bytes, signature: bytes) -> None:
        if peer.role != "site" or peer.signing_key is None:
            raise PermissionDenied(f"certificate of {peer.name!r} is not a site certificate with a signing key")
        st = self._current(round)
        try:
            peer.signing_key.verify(signature, keys)
        except Exception:  # cryptography.exceptions.InvalidSignature
            raise InvalidUpdate("SecAgg keys signature does not verify with the site's certificate key") from None
        k = _parse_keys(keys)
        if (k.federation_id, k.round, k.site) != (self.federation_id, round, peer.name):
            raise InvalidUpdate(f"SecAgg keys are for {k.federation_id!r}/round {k.round}/{k.site!r}, expected "
                                f"{self.federation_id!r}/round {round}/{peer.name!r}")
        if k.attempt != attempt_of(st):
            raise WrongRound(f"SecAgg keys are for attempt {k.attempt} of round {round}; attempt {attempt_of(st)} runs")
        if peer.name in _members(st, "excluded"):
            raise WrongRound(f"site {peer.name!r} is left out of attempt {attempt_of(st)} of round {round} (it was "
                             "missing or misbehaved in an earlier attempt)")
        if peer.name in self._present(round, "advertise", st):
            if any(site == peer.name and k == keys for site, _, k, _ in self.store.secagg_keys(round)):
                return  # a retried call
            raise WrongRound(f"site {peer.name!r} already advertised other keys for round {round} (a restarted site "
                             "is a dropout of the round it left)")
        self._require(st, "advertise", round)
        self.store.secagg_put_keys(round, peer.name, cert_pem, keys, signature)
        log.info("[SecAggService.AdvertiseKeys] round=%d site=%s", round, peer.name)
        self._after_change(round)

    def roster(self, peer: PeerIdentity, round: int) -> tuple[str, list[tuple[str, bytes, bytes, bytes]],
                                                             spb.SecAggParams | None]:
        st = self._peek(round)
        if st["stage"] == "advertise":
            return ("excluded" if peer.name in _members(st, "excluded") else "wait"), [], None
        roster = _members(st, "roster")
        if peer.name not in roster:
            return "excluded", [], None
        entries = [k for k in self.store.secagg_keys(round) if k[0] in roster]
        params = spb.SecAggParams(threshold=st["threshold"], clip_range=self.spec.clip_range, bits=self.spec.bits,
                                  vector_length=self.length)
        return "ready", entries, params

    # -- stage 1: share keys ----------------------------------------------------------------------------------------
    def share_keys(self, peer: PeerIdentity, round: int, shares: list[tuple[str, bytes]]) -> None:
        st = self._current(round)
        if peer.name in self._present(round, "share", st):
            return
        self._require(st, "share", round)
        roster = _members(st, "roster")
        if peer.name not in roster:
            raise WrongRound(f"site {peer.name!r} is not in round {round}'s secure-aggregation roster")
        to = [s for s, _ in shares]
        if sorted(to) != sorted(set(roster) - {peer.name}):
            raise InvalidUpdate("ShareKeys must carry exactly one share for every other roster site")
        if any(not 0 < len(ct) <= MAX_CIPHERTEXT for _, ct in shares):
            raise InvalidUpdate(f"an encrypted share must be 1..{MAX_CIPHERTEXT} bytes")
        self.store.secagg_put_shares(round, peer.name, shares)
        log.info("[SecAggService.ShareKeys] round=%d site=%s shares=%d", round, peer.name, len(shares))
        self._after_change(round)

    def shares_for(self, peer: PeerIdentity, round: int) -> tuple[str, list[tuple[str, bytes]]]:
        st = self._peek(round)
        if st["stage"] == "failed":
            return "excluded", []
        if STAGES.index(st["stage"]) <= STAGES.index("share"):
            return ("excluded" if st["stage"] == "share" and peer.name not in _members(st, "roster") else "wait"), []
        sharers = _members(st, "sharers")
        if peer.name not in sharers:
            return "excluded", []
        return "ready", [(f, ct) for f, t, ct in self.store.secagg_shares(round) if t == peer.name and f in sharers]

    # -- stage 2: masked input (through UploadUpdate) --------------------------------------------------------------
    def check_upload(self, site: str, round: int) -> None:
        """Called by the engine on every envelope: only a site that shared keys uploads, during the masked stage."""
        st = self._peek(round)
        if st["stage"] != "masked" or site not in _members(st, "sharers"):
            raise WrongRound(f"round {round} takes no masked input from {site!r} now (secure-aggregation stage "
                             f"{st['stage']!r})")

    def check_masked(self, state: dict[str, torch.Tensor]) -> None:
        """The payload is one int64 vector of the agreed length (raises codec.CodecError otherwise)."""
        t = state.get(MASKED_KEY)
        if set(state) != {MASKED_KEY} or t is None or t.dtype != torch.int64 or tuple(t.shape) != (self.length,):
            raise codec.CodecError(f"a masked input is one int64 tensor {MASKED_KEY!r} of {self.length} elements")

    # -- consistency check (Bonawitz et al. CCS 2017, active security) --------------------------------------------
    def unmask_request(self, peer: PeerIdentity, round: int) -> tuple[str, list[str], list[str]]:
        st = self._peek(round)
        if st["stage"] == "failed":
            return "excluded", [], []
        if STAGES.index(st["stage"]) <= STAGES.index("masked"):
            return "wait", [], []
        survivors = _members(st, "survivors")
        if peer.name not in survivors:
            return "excluded", [], []
        return "ready", survivors, _members(st, "dropped")

    def sign_survivors(self, peer: PeerIdentity, round: int, attempt: int, signature: bytes) -> None:
        """A survivor's Ed25519 signature over (round, attempt, sorted survivors): kept to show every survivor."""
        st = self._current(round)
        if attempt != attempt_of(st):
            raise WrongRound(f"round {round} runs SecAgg attempt {attempt_of(st)}, not {attempt}")
        sigs: dict[str, str] = st["members"].get("signatures", {})
        if sigs.get(peer.name) == signature.hex():
            return  # a retried call
        self._require(st, "consistency", round)
        survivors = _members(st, "survivors")
        if peer.name not in survivors:
            raise WrongRound(f"site {peer.name!r} sent no masked input in round {round}")
        if peer.signing_key is None:
            raise PermissionDenied(f"certificate of {peer.name!r} has no signing key")
        try:
            peer.signing_key.verify(signature, sa.consistency_message(self.federation_id, round, attempt, survivors))
        except Exception:  # cryptography.exceptions.InvalidSignature
            raise InvalidUpdate("the survivor-set signature does not verify with the site's certificate key over "
                                f"round {round}, attempt {attempt} and the {len(survivors)} survivors") from None
        if peer.name in sigs:
            raise InvalidUpdate(f"site {peer.name!r} already signed the survivor set of round {round}")
        st["members"]["signatures"] = {**sigs, peer.name: signature.hex()}
        self.store.secagg_set_round(round, st["stage"], st["deadline_ms"], st["threshold"], st["members"])
        log.info("[SecAggService.SignSurvivors] round=%d site=%s", round, peer.name)
        self._after_change(round)

    def survivor_signatures(self, peer: PeerIdentity, round: int) -> tuple[str, int, list[str], list[tuple[str, bytes]]]:
        """``(status, attempt, survivors, [(signer, signature)])`` once the consistency stage closed."""
        st = self._peek(round)
        if st["stage"] == "failed":
            return "excluded", 0, [], []
        if STAGES.index(st["stage"]) <= STAGES.index("consistency"):
            return "wait", attempt_of(st), [], []
        signers = _members(st, "signers")
        if peer.name not in signers:
            return "excluded", attempt_of(st), [], []
        sigs = st["members"].get("signatures", {})
        return "ready", attempt_of(st), _members(st, "survivors"), [(s, bytes.fromhex(sigs[s])) for s in signers]

    # -- stage 3: unmasking ----------------------------------------------------------------------------------------
    def reveal(self, peer: PeerIdentity, round: int, shares: list[tuple[str, str, bytes]],
               undecryptable: list[str] | None = None) -> None:
        st = self._current(round)
        if peer.name in self._present(round, "unmask", st):
            return
        self._require(st, "unmask", round)
        survivors, dropped = _members(st, "survivors"), _members(st, "dropped")
        if peer.name not in _members(st, "signers"):
            raise WrongRound(f"site {peer.name!r} did not sign round {round}'s survivor set (or sent no masked input)")
        want = {(s, SEED) for s in survivors} | {(d, MASK_KEY) for d in dropped}
        got = [(a, k) for a, k, _ in shares]
        bad = sorted(set(undecryptable or ()))
        # A share this site could not decrypt is left out, and its dealer named: it is the dealer's misbehaviour.
        if len(set(got)) != len(got) or not set(got) <= want or any((a, k) not in set(got) and a not in bad
                                                                   for a, k in want):
            raise InvalidUpdate("UnmaskShares must reveal exactly the seed shares of the survivors and the mask-key "
                                "shares of the dropped sites (less those named undecryptable)")
        if any(len(s) != sa.SHARE_BYTES for _, _, s in shares):
            raise InvalidUpdate(f"a revealed share is {sa.SHARE_BYTES} bytes")
        if bad:
            self.audit("secagg_share_undecryptable", {"round": round, "attempt": attempt_of(st), "site": peer.name,
                                                      "dealers": bad[:64]})
        self.store.secagg_put_reveals(round, peer.name, shares)
        log.info("[SecAggService.UnmaskShares] round=%d site=%s", round, peer.name)
        self._after_change(round)

    def _after_change(self, round: int) -> None:
        if self.tick(round):
            self.on_ready()
        self._notify()

    def unmask(self, round: int, ups: list[UpdateRow]) -> Aggregate:
        """Sum the survivors' masked inputs, remove every mask, and return the weighted mean delta.

        The unmasking stage only closed after the same computation succeeded (:meth:`tick`), so this does not
        fail on shares or inputs that do not fit: a round that reads as closing can always be aggregated.
        """
        st = self._state(round)
        return self._unmask(round, st, ups=ups)

    def _secret(self, revealed: dict[tuple[str, str], list[bytes]], site: str, kind: str, t: int) -> bytes:
        shares = revealed.get((site, kind), [])
        what = "self-mask seed" if kind == SEED else "mask key"
        try:
            if not sa.shamir_consistent(shares, t):
                raise Misbehaviour(f"the revealed shares of {site!r}'s {what} are not shares of one secret", [site])
            return sa.shamir_combine(shares, t)
        except sa.SecAggCryptoError as e:
            raise Misbehaviour(f"the shares of {site!r}'s {what} do not reconstruct it: {e}", [site]) from None

    def _unmask(self, round: int, st: dict[str, Any], revealers: list[str] | None = None,
                ups: list[UpdateRow] | None = None) -> Aggregate:
        """Remove every mask; raise :class:`Misbehaviour` naming the dealers whose shares do not fit their keys."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        survivors, dropped, t = _members(st, "survivors"), _members(st, "dropped"), st["threshold"]
        by_site = {u.site: u for u in (ups if ups is not None else self.store.updates(round))}
        total = np.zeros(self.length, dtype=np.uint64)
        for s in survivors:
            state = tensors.decode_state(by_site[s].path.read_bytes())
            self.check_masked(state)
            total += state[MASKED_KEY].numpy().view(np.uint64)
        revealed: dict[tuple[str, str], list[bytes]] = {}
        for frm, about, kind, share in self.store.secagg_reveals(round):
            if revealers is None or frm in revealers:
                revealed.setdefault((about, kind), []).append(share)
        keys = {site: _parse_keys(k) for site, _, k, _ in self.store.secagg_keys(round)}
        secrets: dict[str, bytes] = {}
        bad: list[str] = []
        for d in dropped:
            try:
                s_sk = self._secret(revealed, d, MASK_KEY, t)
                if sa.public_bytes(X25519PrivateKey.from_private_bytes(s_sk)) != keys[d].mask_public_key:
                    raise Misbehaviour(f"revealed shares of {d!r}'s mask key do not match its advertised key", [d])
                secrets[d] = s_sk
            except Misbehaviour:
                bad.append(d)
        seeds: dict[str, bytes] = {}
        for s in survivors:
            try:
                seeds[s] = self._secret(revealed, s, SEED, t)
            except Misbehaviour:
                bad.append(s)
        if bad:
            raise Misbehaviour(f"the revealed shares of {sorted(bad)} do not fit the keys those sites advertised "
                               "(they dealt inconsistent shares)", sorted(bad))
        for s in survivors:
            total -= sa.prg(seeds[s], self.length)
        for d in dropped:
            for s in survivors:  # s added sign(s, d) * PRG(s_sd); remove that dangling mask
                seed = sa.agree(secrets[d], keys[s].mask_public_key, sa.mask_context(self.federation_id, round))
                mask = sa.prg(seed, self.length)
                total = total - mask if sa.pairwise_sign(s, d) > 0 else total + mask
        values = self.quantizer.dequantize(total)
        weight = values[-1]
        # An honest sum lies within N * clip_range everywhere and its weight is a whole number of examples (to
        # N * step / 2); a wrong mask leaves uniform garbage over 2^64 steps, which fails this with certainty.
        limit = len(survivors) * self.spec.clip_range + len(survivors) * self.quantizer.step
        if not (weight > 0.5 and np.abs(values).max() <= limit
                and abs(weight - round_half(weight)) <= len(survivors) * self.quantizer.step / 2 + 1e-9):
            raise Misbehaviour("the unmasked sum is not a sum of valid inputs (a masked input or a share was made "
                               "with other keys); no single site can be named", [])
        mean = sa.unflatten(values[:-1] / weight, self.spec_tensors)
        info = {"sites": survivors, "dropped": dropped, "threshold": t, "total_weight": int(round_half(weight)),
                "attempt": attempt_of(st), "quantization_step": self.quantizer.step,
                "max_abs_error_bound": len(survivors) * self.quantizer.step / 2 / weight}
        return Aggregate(mean, int(round_half(weight)), info)


def round_half(x: float) -> float:
    return float(np.rint(x))


def _parse_keys(raw: bytes) -> spb.SecAggKeys:
    k = spb.SecAggKeys()
    try:
        k.ParseFromString(raw)
    except Exception:  # google.protobuf.message.DecodeError
        raise InvalidUpdate("SecAgg keys are not a SecAggKeys message") from None
    if len(k.cipher_public_key) != 32 or len(k.mask_public_key) != 32 or k.cipher_public_key == k.mask_public_key:
        raise InvalidUpdate("SecAgg keys must be two distinct 32-byte X25519 public keys")
    return k
