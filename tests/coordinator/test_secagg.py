"""Secure aggregation in process: 5 sites (real site-side crypto, CA-signed certificates) against the real round
engine and store, with one dropout; the unmasked mean matches plain FedAvg within the quantisation bound and the
store holds no individual update."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.config import FederationConfig, SecureAggregationSpec, TlsSpec
from coordinator.errors import InvalidUpdate, WrongRound
from coordinator.ingress.uploads import Chunk
from coordinator.privacy.secagg import MASK_KEY, SEED
from coordinator.rounds.adapter import AdapterInit
from coordinator.rounds.engine import RoundEngine
from coordinator.rounds.store import Store
from coordinator.trust.pki import CertificateAuthority, peer_identity
from fedcommon import secagg as sa
from fedcommon import tensors
from protos import codec
from protos.fedbridge.v1 import secagg_service_pb2 as spb
from site_agent.egress.secagg import SecAggError, SiteSecAgg
from strategies.registry import build_strategy
from strategies.types import ClientUpdate

BASE_SHA = "cd" * 32
FED = "fed"
KIND = {spb.SECRET_KIND_SELF_MASK_SEED: SEED, spb.SECRET_KIND_MASK_KEY: MASK_KEY}
# Coarse on purpose, so the quantisation error is visible and the bound is checked: step = 64 / 2^19 = 2^-13.
COARSE = {"clip_range": 64.0, "bits": 20}


def _init() -> AdapterInit:
    g = torch.Generator().manual_seed(1)
    state = {"m.lora_A.weight": torch.randn(4, 16, generator=g), "m.lora_B.weight": torch.zeros(16, 4),
             "n.lora_A.weight": torch.randn(4, 8, generator=g), "n.lora_B.weight": torch.zeros(8, 4)}
    return AdapterInit(state, tensors.make_adapter_spec(state, 4, 8.0, 0.0, ["m", "n"]))


class SimSite:
    """A site with a CA-issued certificate and its envelope-signing key."""

    def __init__(self, ca: CertificateAuthority, name: str, n: int, seed: int) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.cert_pem, _ = ca.issue(name, "site", signing_key=self.key.public_key())
        self.peer = peer_identity(self.cert_pem)
        self.name, self.n = name, n
        g = torch.Generator().manual_seed(seed)
        self.delta = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in _init().state.items()}
        self.proto = SiteSecAgg(FED, 1, name, self.key, ca.cert_pem)


def _engine(state_dir: Path, strategy: str = "fedavg", **secagg: object) -> RoundEngine:
    cfg = FederationConfig(federation_id=FED, base_model=state_dir / "base", state_dir=state_dir,
                           registry_dir=state_dir / "reg", tls=TlsSpec(Path("c"), Path("c"), Path("k")), rounds=2,
                           min_sites=3, strategy=strategy, secure_aggregation=SecureAggregationSpec(enabled=True, **secagg))  # type: ignore[arg-type]
    return RoundEngine(cfg, Store(cfg.state_dir), BASE_SHA, _init())


async def _chunks(signed, payload: bytes) -> AsyncIterator[Chunk]:  # type: ignore[no-untyped-def]
    first = True
    for off, data in codec.iter_chunks(payload, 4096, 0):
        yield Chunk(signed if first else None, off, data)
        first = False


def _spec_tensors() -> list[tuple[str, tuple[int, ...]]]:
    return [(t.name, tuple(t.shape)) for t in _init().spec.tensors]


async def _run_to_masked(eng: RoundEngine, sites: list[SimSite], senders: list[SimSite]) -> None:
    """Stages 0-2 for every site; only ``senders`` upload their masked input."""
    sec = eng.secagg
    assert sec is not None
    for s in sites:
        eng.join(s.peer, "test", 0)
    for s in sites:
        signed = s.proto.advertise()
        sec.advertise(s.peer, s.cert_pem, 1, signed.keys, signed.signature)
    for s in sites:
        status, entries, params = sec.roster(s.peer, 1)
        assert status == "ready" and params is not None
        assert params.threshold == max(sec.spec.threshold, len(sites) // 2 + 1)
        shares = s.proto.share([spb.RosterEntry(site=n, certificate_pem=pem, keys=spb.SignedSecAggKeys(
            keys=k, signature=sig)) for n, pem, k, sig in entries], params, sa.vector_length(_spec_tensors()))
        sec.share_keys(s.peer, 1, [(x.site, x.ciphertext) for x in shares])
    for s in senders:
        status, got = sec.shares_for(s.peer, 1)
        assert status == "ready" and len(got) == len(sites) - 1
        masked = s.proto.mask([spb.EncryptedShare(site=f, ciphertext=ct) for f, ct in got], s.delta,
                              _spec_tensors(), float(s.n))
        payload = tensors.encode_state({"secagg.masked": torch.from_numpy(masked)})
        env = codec.make_envelope(federation_id=FED, round=1, site=s.name, base_model_sha256=BASE_SHA,
                                  payload=payload, adapter_spec_sha256=_init().spec.sha256, num_examples=1)
        assert (await eng.ingress.receive_upload(s.peer, _chunks(codec.sign_envelope(env, s.key), payload))).accepted


async def _reveal(eng: RoundEngine, revealers: list[SimSite], now: list[float] | None = None) -> None:
    """The consistency check (each revealer signs the survivor set), then each revealer's shares."""
    sec = eng.secagg
    assert sec is not None
    sets = {}
    for s in revealers:
        status, survivors, dropped = sec.unmask_request(s.peer, 1)
        assert status == "ready"
        sets[s.name] = dropped
        sec.sign_survivors(s.peer, 1, 0, s.proto.sign_survivors(survivors, dropped, 0))
    if eng.store.secagg_round(1)["stage"] == "consistency":  # type: ignore[index]
        assert now is not None  # a survivor that never signs is waited for until the stage deadline
        now[0] += 31
        sec.tick(1)
    for s in revealers:
        status, attempt, survivors, sigs = sec.survivor_signatures(s.peer, 1)
        assert status == "ready"
        shown = [spb.SurvivorSignature(site=n, signature=sig) for n, sig in sigs]
        sec.reveal(s.peer, 1, [(r.site, KIND[r.kind], r.share)
                               for r in s.proto.reveal(survivors, sets[s.name], attempt, shown)])


def _stop(eng: RoundEngine) -> None:
    for t in list(eng._tasks):
        t.cancel()
    eng.store.close()


@pytest.mark.parametrize("dropout", ["before_masked_input", "after_masked_input"])
def test_five_sites_one_dropout_equals_fedavg_and_store_holds_no_individual_update(tmp_path: Path,
                                                                                   dropout: str) -> None:
    # Prepare: 5 sites with different weights; site-e drops either before sending its masked input (its dangling
    # pairwise masks are recovered from s_sk shares) or right after it (it never reveals; its input counts).
    ca = CertificateAuthority.create()
    sites = [SimSite(ca, f"site-{c}", n, i) for i, (c, n) in enumerate(zip("abcde", (10, 20, 30, 40, 50), strict=True))]
    senders = sites[:4] if dropout == "before_masked_input" else sites
    counted = sites[:4] if dropout == "before_masked_input" else sites
    now = [1000.0]

    async def main() -> None:
        eng = _engine(tmp_path / "state", threshold=3, stage_timeout_s=30, **COARSE)
        assert eng.secagg is not None
        eng.secagg.clock = lambda: now[0]
        await eng.start()
        await _run_to_masked(eng, sites, senders)
        # A restart mid-protocol resumes from the store (masked inputs and stage state are durable).
        _stop(eng)
        eng = _engine(tmp_path / "state", threshold=3, stage_timeout_s=30, **COARSE)
        assert eng.secagg is not None
        eng.secagg.clock = lambda: now[0]
        await eng.start()
        if dropout == "before_masked_input":
            now[0] += 31  # site-e missed the masked-input deadline: dropped
            eng.secagg.tick(1)
            with pytest.raises(WrongRound):  # and cannot come back
                eng.secagg.check_upload("site-e", 1)
        await _reveal(eng, sites[:4], now)  # site-e never reveals in either case
        now[0] += 31  # the unmask stage closes with 4 of 5 (or 4 of 4) revealers
        eng.secagg.tick(1)
        eng.secagg.on_ready()
        for _ in range(600):  # round 1 closes in the engine's worker thread
            if eng.store.rounds()[0].state == "closed":
                break
            await asyncio.sleep(0.05)
        _stop(eng)

    # Execute
    asyncio.run(main())
    # Assert: the published mean equals plain FedAvg of the counted sites' deltas within the stated bound
    store = Store(tmp_path / "state")
    rnd = store.rounds()[0]
    assert rnd.state == "closed"
    info = rnd.info["secure_aggregation"]
    assert info["sites"] == [s.name for s in senders]
    assert info["dropped"] == ([] if dropout == "after_masked_input" else ["site-e"])
    assert info["total_weight"] == sum(s.n for s in counted)
    g_in = _init().state
    want = build_strategy("fedavg").aggregate(g_in, [ClientUpdate(s.name, s.delta, s.n) for s in counted]).state
    got = tensors.decode_state(store.adapter_path(2).read_bytes())
    step = COARSE["clip_range"] / 2 ** (COARSE["bits"] - 1)
    bound = len(counted) * step / 2 / sum(s.n for s in counted)  # N * step / 2 / W, plus float32 rounding
    assert info["max_abs_error_bound"] == pytest.approx(bound)
    errs = [float((got[k].double() - want[k].double()).abs().max()) for k in want]
    assert max(errs) <= bound + 1e-6
    assert max(errs) > 1e-7  # quantisation really happened (the bound is not vacuous)
    wrong = build_strategy("fedavg").aggregate(g_in, [ClientUpdate(s.name, s.delta, s.n) for s in sites]).state
    if dropout == "before_masked_input":  # the dropped site's update is not in the result
        assert max(float((got[k] - wrong[k]).abs().max()) for k in want) > 100 * bound
    # ... and nothing in the coordinator's state directory is an individual update in the clear
    _assert_no_individual_update(tmp_path / "state", sites, step)
    # routed and revealed shares are gone after the round; the masked inputs remain, masked
    assert store.secagg_shares(1) == [] and store.secagg_reveals(1) == []
    assert len(store.updates(1)) == len(senders)


def _assert_no_individual_update(state_dir: Path, sites: list[SimSite], step: float) -> None:
    q = sa.Quantizer(COARSE["clip_range"], COARSE["bits"])
    files = [p for p in state_dir.rglob("*") if p.is_file()]
    blob = b"".join(p.read_bytes() for p in files)  # SQLite db + WAL + every artifact
    assert any(p.suffix == ".safetensors" and "updates" in p.parts for p in files)
    for s in sites:
        plain = sa.flatten_weighted(s.delta, _spec_tensors(), float(s.n))
        needles = [s.delta[k][0, :4].numpy().tobytes() for k in s.delta] + [
            q.quantize(plain)[:4].tobytes(), (plain[:4] / s.n).astype(np.float32).tobytes(),
            plain[:4].astype(np.float32).tobytes()]
        for needle in needles:
            assert needle not in blob
        for p in files:
            if p.suffix != ".safetensors":
                continue
            for name, t in tensors.decode_state(p.read_bytes()).items():
                if t.dtype == torch.int64:  # a masked input: not the site's quantised input
                    assert np.mean(t.numpy().view(np.uint64) == q.quantize(plain)) < 0.01
                elif name in s.delta:  # no stored adapter is this delta, or the global moved by it alone
                    for ref in (s.delta[name], _init().state[name] + s.delta[name]):
                        assert not torch.allclose(t, ref, atol=max(10 * step, 1e-3))


def test_ffa_lora_under_secure_aggregation_keeps_a_and_averages_b(tmp_path: Path) -> None:
    # Prepare: FFA-LoRA sites train B only, so their A deltas are exactly zero
    ca = CertificateAuthority.create()
    sites = [SimSite(ca, f"site-{c}", n, i) for i, (c, n) in enumerate(zip("abc", (5, 10, 25), strict=True))]
    for s in sites:
        s.delta = {k: (torch.zeros_like(v) if "lora_A" in k else v) for k, v in s.delta.items()}

    async def main() -> None:
        eng = _engine(tmp_path / "state", strategy="ffa_lora", threshold=2, **COARSE)
        await eng.start()
        await _run_to_masked(eng, sites, sites)
        await asyncio.sleep(0.2)
        await _reveal(eng, sites)
        for _ in range(600):
            if eng.store.rounds()[0].state == "closed":
                break
            await asyncio.sleep(0.05)
        _stop(eng)

    # Execute
    asyncio.run(main())
    # Assert: A is bit-for-bit the global A (a zero sum stays exactly zero), B is the weighted mean within the bound
    got = tensors.decode_state(Store(tmp_path / "state").adapter_path(2).read_bytes())
    want = build_strategy("ffa_lora").aggregate(_init().state, [ClientUpdate(s.name, s.delta, s.n) for s in sites]).state
    bound = 3 * (COARSE["clip_range"] / 2 ** (COARSE["bits"] - 1)) / 2 / 40
    for k in want:
        if "lora_A" in k:
            assert torch.equal(got[k], _init().state[k])
        else:
            assert float((got[k].double() - want[k].double()).abs().max()) <= bound + 1e-6
            assert float(want[k].abs().max()) > 100 * bound


def test_sites_refuse_an_unmask_request_that_asks_for_both_secrets(tmp_path: Path) -> None:
    # Prepare: a coordinator that lists one site as survivor and dropped at once
    ca = CertificateAuthority.create()
    sites = [SimSite(ca, f"site-{c}", 10, i) for i, c in enumerate("abc")]

    async def main() -> None:
        eng = _engine(tmp_path / "state", threshold=2)
        await eng.start()
        await _run_to_masked(eng, sites, sites)
        await asyncio.sleep(0.2)  # the engine's background step closes the masked-input stage
        assert eng.store.secagg_round(1)["stage"] == "consistency"  # type: ignore[index]
        for s in sites:
            sec = eng.secagg
            assert sec is not None
            sec.sign_survivors(s.peer, 1, 0, s.proto.sign_survivors([x.name for x in sites], [], 0))
        assert eng.store.secagg_round(1)["stage"] == "unmask"  # type: ignore[index]
        # Execute / Assert
        with pytest.raises(SecAggError, match="survivor and dropped"):
            sites[0].proto.reveal(["site-a", "site-b"], ["site-b"])
        with pytest.raises(SecAggError, match="survivor and dropped"):
            sites[0].proto.sign_survivors(["site-a", "site-b"], ["site-b"], 0)
        # and the coordinator refuses a reveal that is not exactly the requested sets
        with pytest.raises(InvalidUpdate, match="exactly"):
            eng.secagg.reveal(sites[0].peer, 1, [("site-a", SEED, b"\0" * sa.SHARE_BYTES)])  # type: ignore[union-attr]
        _stop(eng)

    asyncio.run(main())


def test_a_stage_below_threshold_at_its_deadline_is_abandoned_and_retried_without_the_missing_sites(
        tmp_path: Path) -> None:
    # Prepare: 6 sites, threshold 4; only 3 send masked inputs (the old code waited forever in stage 'masked')
    ca = CertificateAuthority.create()
    sites = [SimSite(ca, f"site-{c}", 10, i) for i, c in enumerate("abcdef")]
    now = [0.0]

    async def main() -> None:
        eng = _engine(tmp_path / "state", threshold=2, stage_timeout_s=5)
        assert eng.secagg is not None
        eng.secagg.clock = lambda: now[0]
        await eng.start()
        await _run_to_masked(eng, sites, sites[:3])
        assert eng.store.secagg_round(1)["threshold"] == 4  # type: ignore[index]
        now[0] += 4
        eng.secagg.tick(1)
        assert eng.store.secagg_round(1)["stage"] == "masked"  # type: ignore[index]  # not before the deadline
        # Execute: the deadline passes with 3 < 4 masked inputs
        now[0] += 2
        eng.secagg.tick(1)
        # Assert: attempt 1 starts at the roster without the 3 missing sites; the masked inputs of attempt 0 are gone
        st = eng.store.secagg_round(1)
        assert st is not None and st["stage"] == "advertise" and st["members"]["attempt"] == 1
        assert st["members"]["excluded"] == ["site-d", "site-e", "site-f"]
        assert eng.store.updates(1) == [] and eng.store.secagg_keys(1) == []
        assert eng.store.current_round().state == "open"  # type: ignore[union-attr]
        assert (await eng.fetch_task(sites[0].peer, 0)).status == "train"  # offered the round again
        assert (await eng.fetch_task(sites[3].peer, 0)).status == "wait"  # left out of this attempt
        _stop(eng)

    asyncio.run(main())
    events = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    abandoned = [e for e in events if e.get("event") == "secagg_attempt_abandoned"]
    assert abandoned and abandoned[0]["fields"]["missing"] == ["site-d", "site-e", "site-f"]


def test_a_late_or_restarted_site_is_left_out_of_the_round(tmp_path: Path) -> None:
    # Prepare: 4 sites joined; 3 advertise and the roster closes at the deadline without site-d
    ca = CertificateAuthority.create()
    sites = [SimSite(ca, f"site-{c}", 10, i) for i, c in enumerate("abcd")]
    now = [0.0]

    async def main() -> None:
        eng = _engine(tmp_path / "state", threshold=2, stage_timeout_s=5)
        sec = eng.secagg
        assert sec is not None
        sec.clock = lambda: now[0]
        await eng.start()
        for s in sites:
            eng.join(s.peer, "test", 0)
        for s in sites[:3]:
            signed = s.proto.advertise()
            sec.advertise(s.peer, s.cert_pem, 1, signed.keys, signed.signature)
        assert (await eng.fetch_task(sites[3].peer, 0)).status == "train"  # the roster is still open
        now[0] += 6
        sec.tick(1)
        # Execute / Assert: site-d is told to wait and its keys are refused; site-a restarted with new keys too
        assert sec.roster(sites[0].peer, 1)[0] == "ready" and sec.roster(sites[3].peer, 1)[0] == "excluded"
        assert (await eng.fetch_task(sites[3].peer, 0)).status == "wait"
        late = sites[3].proto.advertise()
        with pytest.raises(WrongRound, match="stage 'share'"):
            sec.advertise(sites[3].peer, sites[3].cert_pem, 1, late.keys, late.signature)
        again = SiteSecAgg(FED, 1, "site-a", sites[0].key, ca.cert_pem).advertise()
        with pytest.raises(WrongRound, match="already advertised other keys"):
            sec.advertise(sites[0].peer, sites[0].cert_pem, 1, again.keys, again.signature)
        same = sites[0].proto.advertise()  # a retried call with the same keys is fine
        sec.advertise(sites[0].peer, sites[0].cert_pem, 1, same.keys, same.signature)
        # keys signed by another site's key are refused
        forged = SiteSecAgg(FED, 1, "site-d", sites[1].key, ca.cert_pem).advertise()
        with pytest.raises(InvalidUpdate, match="signature"):
            sec.advertise(sites[3].peer, sites[3].cert_pem, 1, forged.keys, forged.signature)
        _stop(eng)

    asyncio.run(main())


def test_roster_refuses_a_substituted_key(tmp_path: Path) -> None:
    # Prepare: the coordinator swaps site-b's signed keys for keys it made itself
    ca = CertificateAuthority.create()
    a, b = SimSite(ca, "site-a", 10, 0), SimSite(ca, "site-b", 10, 1)
    fake = SiteSecAgg(FED, 1, "site-b", Ed25519PrivateKey.generate(), ca.cert_pem).advertise()
    entries = [spb.RosterEntry(site="site-a", certificate_pem=a.cert_pem, keys=a.proto.advertise()),
               spb.RosterEntry(site="site-b", certificate_pem=b.cert_pem, keys=fake)]
    params = spb.SecAggParams(threshold=2, clip_range=1.0, bits=16, vector_length=sa.vector_length(_spec_tensors()))
    # Execute / Assert
    with pytest.raises(SecAggError, match="not signed by the site's certificate key"):
        a.proto.share(entries, params, sa.vector_length(_spec_tensors()))
    # a certificate from another CA is refused too
    other = CertificateAuthority.create()
    entries[1] = spb.RosterEntry(site="site-b", certificate_pem=other.issue("site-b", "site",
                                 signing_key=b.key.public_key())[0], keys=b.proto.advertise())
    with pytest.raises(SecAggError, match="not issued by the federation CA"):
        a.proto.share(entries, params, sa.vector_length(_spec_tensors()))


def test_closing_a_round_deletes_its_shares_in_the_same_transaction(tmp_path: Path) -> None:
    # Prepare: round 1 with routed and revealed shares, round 2 open with its own
    store = Store(tmp_path / "state")
    store.open_round(1, "0" * 64)
    store.secagg_put_shares(1, "site-a", [("site-b", b"ct-ab")])
    store.secagg_put_reveals(1, "site-b", [("site-a", "seed", b"share")])
    store.open_round(2, "1" * 64)
    store.secagg_put_shares(2, "site-a", [("site-b", b"ct-ab-2")])
    # Execute: close round 1 (no separate clean-up step afterwards)
    store.close_round(1, "2" * 64, {})
    # Assert: a round that reads as closed has no share left; the open round keeps its own
    assert store.rounds()[0].state == "closed"
    assert store.secagg_shares(1) == [] and store.secagg_reveals(1) == []
    assert store.secagg_shares(2) == [("site-a", "site-b", b"ct-ab-2")]
    store.close()
