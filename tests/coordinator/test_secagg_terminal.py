"""Secure aggregation that cannot go on (issue #13): a dealer's bad shares must not stop the coordinator, a round
that failed for good is a clean terminal state (one line, exit 3, audited once), and the nonces of masked inputs
deleted with an abandoned attempt stay spent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from coordinator.errors import EXIT_FEDERATION_STOPPED, FederationStopped, ReplayedNonce
from coordinator.rounds.engine import RoundEngine
from coordinator.trust.pki import CertificateAuthority
from fedcommon import secagg as sa
from fedcommon import tensors
from protos import codec
from protos.fedbridge.v1 import secagg_service_pb2 as spb
from site_agent.egress.secagg import SiteSecAgg
from tests.coordinator.test_secagg import (
    BASE_SHA,
    FED,
    SimSite,
    _chunks,
    _engine,
    _init,
    _reveal,
    _run_to_masked,
    _spec_tensors,
    _stop,
)


def _audit(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]


def _cheating_dealer(site: SimSite) -> None:
    """``site`` advertises one mask key and deals Shamir shares of another."""
    advertised = site.proto._keys()
    site.proto.mask_key = sa.private_bytes(sa.new_private_key())
    site.proto._keys = lambda: advertised  # type: ignore[method-assign]


async def _settle(eng: RoundEngine) -> None:
    for _ in range(40):  # the engine aggregates (or fails) in background tasks
        await asyncio.sleep(0.05)
        if eng.failed.is_set():
            return


def test_a_dealers_bad_shares_do_not_stop_the_coordinator_and_a_restart_comes_up(tmp_path: Path) -> None:
    # Prepare: site-e advertises mask key K1, deals shares of K2, then drops before its masked input. Old code: the
    # unmasking raised InvalidUpdate in the aggregation step, the engine failed (the coordinator exited), and each
    # restart failed at the same point, because the round was already marked closing.
    ca = CertificateAuthority.create()
    sites = [SimSite(ca, f"site-{c}", 10, i) for i, c in enumerate("abcde")]
    _cheating_dealer(sites[4])
    now = [0.0]

    async def main() -> None:
        eng = _engine(tmp_path / "state", threshold=3, stage_timeout_s=5)
        assert eng.secagg is not None
        eng.secagg.clock = lambda: now[0]
        await eng.start()
        await _run_to_masked(eng, sites, sites[:4])
        now[0] += 6
        eng.secagg.tick(1)
        await _reveal(eng, sites[:4], now)
        await _settle(eng)
        # Assert: the coordinator did not stop
        assert not eng.failed.is_set(), f"the round engine stopped: {eng.fatal!r}"
        _stop(eng)
        # a restart on that state comes up and stays up
        eng = _engine(tmp_path / "state", threshold=3, stage_timeout_s=5)
        await eng.start()
        await _settle(eng)
        assert not eng.failed.is_set(), f"the restarted round engine stopped: {eng.fatal!r}"
        assert eng.store.current_round().state == "open"  # type: ignore[union-attr]
        _stop(eng)

    asyncio.run(main())
    assert [e["fields"]["site"] for e in _audit(tmp_path / "state") if e["event"] == "secagg_participant_dropped"] \
        == ["site-e"]


def test_a_failed_secure_round_is_a_terminal_state_reported_once(tmp_path: Path) -> None:
    # Prepare: the same cheating dealer with secure_aggregation.max_attempts = 1, so the round fails for good.
    # Old code: the engine failed with a RuntimeError (logged with a traceback) and every restart raised it again.
    ca = CertificateAuthority.create()
    sites = [SimSite(ca, f"site-{c}", 10, i) for i, c in enumerate("abcde")]
    _cheating_dealer(sites[4])
    now = [0.0]

    async def main() -> None:
        eng = _engine(tmp_path / "state", threshold=3, stage_timeout_s=5, max_attempts=1)
        assert eng.secagg is not None
        eng.secagg.clock = lambda: now[0]
        await eng.start()
        await _run_to_masked(eng, sites, sites[:4])
        now[0] += 6
        eng.secagg.tick(1)
        await _reveal(eng, sites[:4], now)
        await asyncio.wait_for(eng.failed.wait(), 5)
        # Assert: a FederationStopped naming the round and the reason, not a crash
        assert isinstance(eng.fatal, FederationStopped), repr(eng.fatal)
        assert str(eng.fatal).startswith("federation stopped: secure round 1 failed: ")
        assert "site-e" in str(eng.fatal)
        _stop(eng)
        for _ in range(2):  # every restart stops on it the same way, and audits nothing more
            eng = _engine(tmp_path / "state", threshold=3, stage_timeout_s=5, max_attempts=1)
            with pytest.raises(FederationStopped, match="federation stopped: secure round 1 failed"):
                await eng.start()
            _stop(eng)

    asyncio.run(main())
    events = [e["event"] for e in _audit(tmp_path / "state")]
    assert events.count("federation_stopped") == 1 and events.count("secagg_round_failed") == 1


def test_serve_exits_with_status_3_and_one_line_on_a_stopped_federation(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: serving raises the terminal state (old code: CoordinatorFailed, exit 1, after a logged traceback)
    import coordinator.server as server
    from coordinator.admin.cli import app

    async def stopped(cfg: Any) -> None:
        raise FederationStopped(4, "only 1 site(s) remain")

    monkeypatch.setattr(server, "serve", stopped)
    monkeypatch.setattr("coordinator.config.load_federation_config", lambda path: type("C", (), {
        "state_dir": tmp_path / "state"})())
    # Execute
    res = CliRunner().invoke(app, ["serve", "--config", str(tmp_path / "federation.toml")])
    # Assert
    assert res.exit_code == EXIT_FEDERATION_STOPPED == 3
    assert "federation stopped: secure round 4 failed: only 1 site(s) remain" in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_a_masked_input_of_an_abandoned_attempt_cannot_be_replayed_into_the_next(tmp_path: Path) -> None:
    # Prepare: attempt 0 is abandoned (site-e dealt bad shares); sites a-d run attempt 1 to its masked stage.
    # Old code: the abandoned attempt's masked inputs were deleted with their nonces, so a recorded envelope of
    # attempt 0 was accepted again in attempt 1 (and the site's own new input refused as a duplicate).
    ca = CertificateAuthority.create()
    sites = [SimSite(ca, f"site-{c}", 10, i) for i, c in enumerate("abcde")]
    _cheating_dealer(sites[4])
    now = [0.0]
    recorded: list[Any] = []

    async def main() -> None:
        eng = _engine(tmp_path / "state", threshold=3, stage_timeout_s=5)
        assert eng.secagg is not None
        eng.secagg.clock = lambda: now[0]
        await eng.start()
        orig = eng.ingress.receive_upload

        async def tap(peer: Any, chunks: Any) -> Any:  # records site-a's attempt-0 envelope as an eavesdropper would
            got = [c async for c in chunks]
            if peer.name == "site-a" and not recorded:
                recorded.append(got)

            async def again() -> Any:
                for c in got:
                    yield c
            return await orig(peer, again())

        eng.ingress.receive_upload = tap  # type: ignore[method-assign]
        await _run_to_masked(eng, sites, sites[:4])
        now[0] += 6
        eng.secagg.tick(1)
        await _reveal(eng, sites[:4], now)
        await _settle(eng)
        st = eng.store.secagg_round(1)
        assert st is not None and st["members"]["attempt"] == 1 and st["stage"] == "advertise"
        for s in sites[:4]:
            s.proto = SiteSecAgg(FED, 1, s.name, s.key, ca.cert_pem, attempt=1)
        eng.ingress.receive_upload = orig  # type: ignore[method-assign]
        await _run_to_masked(eng, sites[:4], [])
        assert eng.store.secagg_round(1)["stage"] == "masked"  # type: ignore[index]
        # Execute: replay site-a's attempt-0 envelope and payload in attempt 1's masked stage

        async def replay() -> Any:
            for c in recorded[0]:
                yield c
        with pytest.raises(ReplayedNonce):
            await eng.ingress.receive_upload(sites[0].peer, replay())
        # Assert: site-a's fresh input of attempt 1 is still taken
        s = sites[0]
        got = eng.secagg.shares_for(s.peer, 1)[1]
        masked = s.proto.mask([spb.EncryptedShare(site=f, ciphertext=ct) for f, ct in got], s.delta, _spec_tensors(),
                              float(s.n))
        payload = tensors.encode_state({"secagg.masked": torch.from_numpy(masked)})
        env = codec.make_envelope(federation_id=FED, round=1, site=s.name, base_model_sha256=BASE_SHA, payload=payload,
                                  adapter_spec_sha256=_init().spec.sha256, num_examples=1)
        assert (await eng.ingress.receive_upload(s.peer, _chunks(codec.sign_envelope(env, s.key), payload))).accepted
        _stop(eng)

    asyncio.run(main())
