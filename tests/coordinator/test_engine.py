"""Round engine: ingress validation, resumable uploads, idempotency, quorum aggregation, resume after restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.config import FederationConfig, TlsSpec
from coordinator.errors import DuplicateUpdate, InvalidUpdate, PermissionDenied, UpdateTooLarge, WrongRound
from coordinator.ingress.uploads import Chunk
from coordinator.rounds.adapter import AdapterInit
from coordinator.rounds.engine import RoundEngine
from coordinator.rounds.store import Store
from coordinator.trust.pki import PeerIdentity
from fedcommon import tensors
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb

BASE_SHA = "ab" * 32


def _init() -> AdapterInit:
    state = {"l.lora_A.weight": torch.ones(2, 4), "l.lora_B.weight": torch.zeros(4, 2)}
    return AdapterInit(state, tensors.make_adapter_spec(state, 2, 4.0, 0.0, ["l"]))


class Site:
    def __init__(self, name: str) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.peer = PeerIdentity(name, "site", self.key.public_key(), 1, name)

    def update(self, round: int, delta: dict[str, torch.Tensor], n: int = 10, **env_over: object
               ) -> tuple[pb.SignedEnvelope, bytes]:
        payload = tensors.encode_state(delta)
        env = codec.make_envelope(federation_id="fed", round=round, site=self.peer.name, base_model_sha256=BASE_SHA,
                                  payload=payload, adapter_spec_sha256=_init().spec.sha256, num_examples=n)
        for k, v in env_over.items():
            setattr(env, "round" if k == "env_round" else k, v)
        return codec.sign_envelope(env, self.key), payload


def _engine(tmp_path: Path, min_sites: int = 2, **over: object) -> RoundEngine:
    cfg = FederationConfig(federation_id="fed", base_model=tmp_path / "base", state_dir=tmp_path / "state",
                           registry_dir=tmp_path / "reg", tls=TlsSpec(Path("c"), Path("c"), Path("k")), rounds=2,
                           min_sites=min_sites, **over)  # type: ignore[arg-type]
    return RoundEngine(cfg, Store(cfg.state_dir), BASE_SHA, _init())


async def _chunks(signed: pb.SignedEnvelope | None, payload: bytes, size: int = 64, offset: int = 0,
                  stop_at: int | None = None) -> AsyncIterator[Chunk]:
    first = True
    for off, data in codec.iter_chunks(payload, size, offset):
        if stop_at is not None and off >= stop_at:
            return
        yield Chunk(signed if first else None, off, data)
        first = False
    if first:
        yield Chunk(signed, offset, b"")


def _delta(a: float, b: float) -> dict[str, torch.Tensor]:
    return {"l.lora_A.weight": torch.full((2, 4), a), "l.lora_B.weight": torch.full((4, 2), b)}


def test_quorum_aggregates_weighted_mean(tmp_path: Path) -> None:
    async def main() -> None:
        eng = _engine(tmp_path)
        await eng.start()
        a, b = Site("a"), Site("b")
        assert (await eng.fetch_task(a.peer, 0)).status == "train"
        s, p = a.update(1, _delta(1.0, 2.0), n=10)
        assert (await eng.ingress.receive_upload(a.peer, _chunks(s, p))).accepted
        assert eng.store.current_round().round == 1  # type: ignore[union-attr]
        assert (await eng.fetch_task(a.peer, 0)).status == "wait"  # already sent this round
        s, p = b.update(1, _delta(4.0, -1.0), n=30)
        assert (await eng.ingress.receive_upload(b.peer, _chunks(s, p))).accepted
        await asyncio.sleep(0.2)
        rounds = eng.store.rounds()
        assert [r.state for r in rounds] == ["closed", "open"]
        new = tensors.decode_state(eng.adapters.adapter_bytes(2))
        # A: 1 + (10*1 + 30*4)/40 = 4.25 ; B: 0 + (10*2 + 30*(-1))/40 = -0.25
        assert torch.allclose(new["l.lora_A.weight"], torch.full((2, 4), 4.25))
        assert torch.allclose(new["l.lora_B.weight"], torch.full((4, 2), -0.25))
        assert rounds[0].info["updates"]["a"]["num_examples"] == 10
    asyncio.run(main())


def test_interrupted_upload_resumes_from_committed_offset(tmp_path: Path) -> None:
    async def main() -> None:
        eng = _engine(tmp_path)
        await eng.start()
        a = Site("a")
        s, p = a.update(1, _delta(1.0, 1.0))
        half = (len(p) // 2 // 64) * 64
        r1 = await eng.ingress.receive_upload(a.peer, _chunks(s, p, stop_at=half))
        assert (r1.accepted, r1.committed_offset) == (False, half)
        env = pb.UpdateEnvelope.FromString(s.envelope)
        assert eng.ingress.upload_status(a.peer, 1, env.payload_sha256) == (half, False)
        r2 = await eng.ingress.receive_upload(a.peer, _chunks(s, p, offset=half))
        assert r2.accepted and r2.committed_offset == len(p)
        assert eng.ingress.upload_status(a.peer, 1, env.payload_sha256) == (len(p), True)
        # The ack was lost and the site retries the same envelope: accepted again, stored once.
        r3 = await eng.ingress.receive_upload(a.peer, _chunks(s, p))
        assert r3.accepted
        assert len(eng.store.updates(1)) == 1
    asyncio.run(main())


@pytest.mark.parametrize("case,error", [
    ("bad_signature", InvalidUpdate), ("other_site", PermissionDenied), ("wrong_round", WrongRound),
    ("wrong_base", InvalidUpdate), ("wrong_spec", InvalidUpdate), ("nan", InvalidUpdate), ("bad_shape", InvalidUpdate),
    ("hash_mismatch", InvalidUpdate), ("too_large", UpdateTooLarge), ("admin_cert", PermissionDenied),
    ("full_kind", InvalidUpdate), ("no_envelope", InvalidUpdate),
])
def test_refused_updates_never_touch_the_round(tmp_path: Path, case: str, error: type[Exception]) -> None:
    async def main() -> None:
        eng = _engine(tmp_path, max_update_bytes=4096)
        await eng.start()
        a = Site("a")
        peer = a.peer
        delta = _delta(1.0, 1.0)
        over: dict[str, object] = {}
        if case == "wrong_round":
            over["env_round"] = 2
        elif case == "wrong_base":
            over["base_model_sha256"] = "cd" * 32
        elif case == "wrong_spec":
            over["adapter_spec_sha256"] = "ef" * 32
        elif case == "full_kind":
            over["payload_kind"] = pb.PAYLOAD_KIND_FULL
        elif case == "nan":
            delta["l.lora_A.weight"][0, 0] = float("nan")
        elif case == "bad_shape":
            delta["l.lora_A.weight"] = torch.zeros(3, 4)
        s, p = a.update(1, delta, **over)
        if case == "bad_signature":
            s = pb.SignedEnvelope(envelope=s.envelope, signature=bytes(64))
        elif case == "other_site":
            peer = PeerIdentity("b", "site", a.key.public_key(), 2, "b")  # right key, wrong identity
        elif case == "hash_mismatch":
            p = p[:-1] + bytes([p[-1] ^ 1])
        elif case == "too_large":
            s, p = a.update(1, delta, payload_size=10_000)
        elif case == "admin_cert":
            peer = PeerIdentity("a", "admin", a.key.public_key(), 3, "x")
        elif case == "no_envelope":
            s = None  # type: ignore[assignment]
        with pytest.raises(error):
            await eng.ingress.receive_upload(peer, _chunks(s, p))
        assert eng.store.updates(1) == []
    asyncio.run(main())


def test_replay_and_duplicate_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        eng = _engine(tmp_path, min_sites=2)
        await eng.start()
        a = Site("a")
        s, p = a.update(1, _delta(1.0, 1.0))
        assert (await eng.ingress.receive_upload(a.peer, _chunks(s, p))).accepted
        s2, p2 = a.update(1, _delta(2.0, 2.0))  # a second, different update for the same round
        with pytest.raises(DuplicateUpdate):
            await eng.ingress.receive_upload(a.peer, _chunks(s2, p2))
        # b replays a's nonce in its own envelope
        b = Site("b")
        env = pb.UpdateEnvelope.FromString(s.envelope)
        sb, pb_ = b.update(1, _delta(1.0, 1.0), nonce=env.nonce)
        with pytest.raises(InvalidUpdate, match="replay"):
            await eng.ingress.receive_upload(b.peer, _chunks(sb, pb_))
        assert [u.site for u in eng.store.updates(1)] == ["a"]
    asyncio.run(main())


def test_restart_resumes_round_and_aggregates_pending_quorum(tmp_path: Path) -> None:
    eng_site_a = Site("a")

    async def first_run() -> None:
        eng = _engine(tmp_path, min_sites=2)
        await eng.start()
        s, p = eng_site_a.update(1, _delta(1.0, 1.0))
        assert (await eng.ingress.receive_upload(eng_site_a.peer, _chunks(s, p))).accepted
        eng.store.close()

    async def second_run() -> None:
        eng = _engine(tmp_path, min_sites=2)
        await eng.start()
        assert [r.state for r in eng.store.rounds()] == ["open"]
        assert [u.site for u in eng.store.updates(1)] == ["a"]  # the accepted update survived
        b = Site("b")
        s, p = b.update(1, _delta(3.0, 3.0))
        assert (await eng.ingress.receive_upload(b.peer, _chunks(s, p))).accepted
        await asyncio.sleep(0.2)
        assert [r.state for r in eng.store.rounds()] == ["closed", "open"]
        new = tensors.decode_state(eng.adapters.adapter_bytes(2))
        assert torch.allclose(new["l.lora_A.weight"], torch.full((2, 4), 3.0))  # 1 + mean(1, 3)

    asyncio.run(first_run())
    asyncio.run(second_run())


def test_metrics_validation(tmp_path: Path) -> None:
    async def main() -> None:
        eng = _engine(tmp_path)
        await eng.start()
        a = Site("a")
        eng.report_metrics(a.peer, 1, "train", {"loss": 1.5}, 8)
        assert eng.store.metrics(1) == [(1, "a", "train", "loss", 1.5, 8)]
        for args, msg in [((1, "gossip", {"x": 1.0}), "phase"), ((9, "train", {"x": 1.0}), "outside"),
                          ((1, "train", {"Sample Text": 1.0}), "names"), ((1, "train", {"x": float("nan")}), "finite")]:
            with pytest.raises(InvalidUpdate, match=msg):
                eng.report_metrics(a.peer, *args, 1)  # type: ignore[arg-type]
    asyncio.run(main())


def test_stateful_strategy_resumes_with_its_server_state(tmp_path: Path) -> None:
    """FedAvgM's momentum is stored with the round, so a restarted coordinator continues the same trajectory."""
    from strategies.registry import build_strategy
    from strategies.types import ClientUpdate

    sites = {"a": Site("a"), "b": Site("b")}
    deltas = {1: {"a": _delta(1.0, 2.0), "b": _delta(3.0, 0.0)}, 2: {"a": _delta(-1.0, 1.0), "b": _delta(0.5, 0.5)}}
    params = {"momentum": 0.9}

    async def run_round(r: int) -> RoundEngine:
        eng = _engine(tmp_path, min_sites=2, strategy="fedavgm", strategy_params=params)
        await eng.start()
        for name, site in sites.items():
            s, p = site.update(r, deltas[r][name])
            assert (await eng.ingress.receive_upload(site.peer, _chunks(s, p))).accepted
        await asyncio.sleep(0.2)
        eng.store.close()
        return eng

    eng = asyncio.run(run_round(1))
    asyncio.run(run_round(2))  # a fresh engine: only the store carries the momentum
    # Expected: the same rule run in memory across both rounds.
    strat = build_strategy("fedavgm", params)
    g = _init().state
    res = strat.aggregate(g, [ClientUpdate(n, d, 10) for n, d in deltas[1].items()])
    res2 = strat.aggregate(res.state, [ClientUpdate(n, d, 10) for n, d in deltas[2].items()], res.server_state)
    got = tensors.decode_state(Store(tmp_path / "state").adapter_path(3).read_bytes())
    for k in got:
        assert torch.allclose(got[k], res2.state[k], atol=1e-6)
    info = Store(tmp_path / "state").rounds()[1].info
    assert info["strategy"] == "fedavgm" and "aggregation_error" in info
    assert eng.strategy.stateful


def test_error_meter_recorded_per_round(tmp_path: Path) -> None:
    async def main() -> None:
        eng = _engine(tmp_path, min_sites=2)
        await eng.start()
        # Two sites whose B·A products average differently from the product of the averages.
        a, b = Site("a"), Site("b")
        for site, (da, db) in ((a, (1.0, 1.0)), (b, (-1.0, 3.0))):
            s, p = site.update(1, _delta(da, db))
            assert (await eng.ingress.receive_upload(site.peer, _chunks(s, p))).accepted
        await asyncio.sleep(0.2)
        err = eng.store.rounds()[0].info["aggregation_error"]
        # A_i = 1 + da, B_i = db: mean(B_i A_i) = (1*2 + 3*0)/2 = 1 ; B̄Ā = 2 * 1 = 2 -> error |1 - 2| / 1 = 1
        assert err["per_module"] == {"l.weight": pytest.approx(1.0)}
    asyncio.run(main())


def test_mixed_ranks_hetlora(tmp_path: Path) -> None:
    """A rank-1 site gets the global truncated to rank 1 and a spec of its own; its update is zero-padded."""
    async def main() -> None:
        eng = _engine(tmp_path, min_sites=2, strategy="hetlora")
        await eng.start()
        low, full = Site("low"), Site("full")
        eng.join(low.peer, "t", 1)
        eng.join(full.peer, "t", 0)
        assert eng.adapters.spec_for("full").sha256 == _init().spec.sha256
        low_spec = eng.adapters.spec_for("low")
        assert low_spec.rank == 1 and low_spec.alpha == 2.0  # alpha/r kept at 4/2
        got = tensors.decode_state(eng.adapters.site_adapter_bytes("low", 1))
        assert tuple(got["l.lora_A.weight"].shape) == (1, 4) and tuple(got["l.lora_B.weight"].shape) == (4, 1)
        low_delta = {"l.lora_A.weight": torch.full((1, 4), 2.0), "l.lora_B.weight": torch.full((4, 1), 2.0)}
        payload = tensors.encode_state(low_delta)
        env = codec.make_envelope(federation_id="fed", round=1, site="low", base_model_sha256=BASE_SHA,
                                  payload=payload, adapter_spec_sha256=low_spec.sha256, num_examples=10)
        assert (await eng.ingress.receive_upload(low.peer, _chunks(codec.sign_envelope(env, low.key), payload))).accepted
        # The full-rank site may not use the low-rank spec, and vice versa.
        s, p = full.update(1, _delta(0.0, 0.0))
        assert (await eng.ingress.receive_upload(full.peer, _chunks(s, p))).accepted
        await asyncio.sleep(0.2)
        new = tensors.decode_state(eng.adapters.adapter_bytes(2))
        # "all" averaging: component 0 moves by 10*2/20 = 1, component 1 (held only by "full", delta 0) stays.
        assert torch.allclose(new["l.lora_A.weight"][0], torch.full((4,), 2.0))
        assert torch.allclose(new["l.lora_A.weight"][1], torch.full((4,), 1.0))
        assert torch.allclose(new["l.lora_B.weight"][:, 0], torch.full((4,), 1.0))
    asyncio.run(main())


def test_rank_mismatch_refused_without_mixed_rank_strategy(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    with pytest.raises(WrongRound, match="mixed ranks need hetlora"):
        eng.join(Site("low").peer, "t", 1)


def test_a_failing_round_stops_loudly_instead_of_hanging(tmp_path: Path) -> None:
    async def main() -> None:
        eng = _engine(tmp_path, min_sites=1)
        await eng.start()

        def broken(round: int, ups: object) -> None:
            raise RuntimeError("disk full")

        eng.steps.aggregate = broken  # type: ignore[method-assign]
        a = Site("a")
        s, p = a.update(1, _delta(1.0, 1.0))
        assert (await eng.ingress.receive_upload(a.peer, _chunks(s, p))).accepted  # stored before the failure
        await asyncio.wait_for(eng.failed.wait(), 5)
        assert isinstance(eng.fatal, RuntimeError) and "disk full" in str(eng.fatal)
        assert [u.site for u in eng.store.updates(1)] == ["a"]  # nothing lost: a restart aggregates it
        assert eng.store.rounds()[0].state == "closing"  # decided (quorum) and durable, not yet aggregated
    asyncio.run(main())


def test_long_polls_sleep_through_updates_and_wake_when_the_round_moves(tmp_path: Path) -> None:
    """A site that already sent this round's update long-polls. The other sites' updates that leave the round
    collecting must not wake it (N sites x N updates of offers a round); the round closing and the next one opening
    must, at once."""
    async def main() -> None:
        eng = _engine(tmp_path, min_sites=3)
        await eng.start()
        a, b, c = Site("a"), Site("b"), Site("c")
        for site in (a, b, c):
            assert (await eng.fetch_task(site.peer, 0)).status == "train"
        s, p = a.update(1, _delta(1.0, 2.0))
        assert (await eng.ingress.receive_upload(a.peer, _chunks(s, p))).accepted
        offers: list[str] = []
        real_offer = eng._offer

        def counted(site: str) -> object:
            offers.append(site)
            return real_offer(site)
        eng._offer = counted  # type: ignore[method-assign]
        poll = asyncio.create_task(eng.fetch_task(a.peer, 30))
        await asyncio.sleep(0.1)
        assert offers == ["a"]  # asked once, then sleeps
        s, p = b.update(1, _delta(4.0, -1.0))
        assert (await eng.ingress.receive_upload(b.peer, _chunks(s, p))).accepted
        await asyncio.sleep(0.3)  # b's update is stored and its advance pass has run
        assert offers == ["a"] and not poll.done()
        s, p = c.update(1, _delta(0.0, 0.0))
        assert (await eng.ingress.receive_upload(c.peer, _chunks(s, p))).accepted
        got = await asyncio.wait_for(poll, 10)
        assert got.status == "train" and got.round == 2  # woken by the round moving on, long before its 30 s
    asyncio.run(main())
