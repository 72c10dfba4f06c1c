"""Each ``fedbridge-admin`` command against a real coordinator with real sites (issue 6, item 3).

The commands run as real CLI processes (``python -m coordinator <cmd> --json``) with the dev PKI's admin kit, against
a coordinator started by ``sandbox.localfed`` with ``autostart = false`` and two real site agents. The tests run in
file order on one federation of ROUNDS rounds: not started -> start -> pause (no round advances) -> resume -> pause and
stop in the middle of a round (sites told done) -> rounds/sites/evals -> publish -> withdraw-site -> restart (the
stopped state survives).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file

from coordinator.rounds.store import Store
from fedcommon import tensors
from fedcommon.tomlconfig import dumps, load_toml
from protos.fedbridge.v1 import admin_service_pb2 as apb
from protos.fedbridge.v1 import admin_service_pb2_grpc as apb_grpc
from sandbox import localfed

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 10  # rounds take ~1-2 s: enough of them that the federation is still running when each test acts on it


@pytest.fixture
def fed(tiny_model_dir: Path, tmp_path: Path) -> Iterator[localfed.LocalFederation]:
    fed = localfed.prepare(tmp_path, tiny_model_dir, n_sites=2, rounds=ROUNDS,
                           training={"max_steps": 8, "batch_size": 4, "learning_rate": 3e-3},
                           lora={"rank": 4, "alpha": 8.0}, n_train=16, n_heldout=4,
                           publish={"site_regions": {"site-a": "EU/DE"}})
    cfg = load_toml(fed.federation_toml)
    cfg.update(autostart=False, exit_when_done=False)
    fed.federation_toml.write_text(dumps(cfg))
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            fed.start_site(s)
        yield fed


def admin(fed: localfed.LocalFederation, *args: str, kit: Path | None = None, as_json: bool = True) -> tuple[int, Any]:
    """Run ``python -m coordinator ARGS`` as a process; returns (exit code, parsed JSON or the raw stdout)."""
    env = dict(os.environ, FEDBRIDGE_COORDINATOR=f"127.0.0.1:{fed.port}",
               FEDBRIDGE_ADMIN_KIT=str(kit or fed.root / "pki" / "admin"))
    proc = subprocess.run([sys.executable, "-m", "coordinator", *args, *(["--json"] if as_json else [])], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    if not as_json:
        return proc.returncode, proc.stdout
    try:
        return proc.returncode, json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"{args}: rc={proc.returncode} stdout={proc.stdout!r} stderr={proc.stderr[-2000:]}") from None


def wait_for(what: str, probe: Callable[[], bool], timeout: float, fed: localfed.LocalFederation) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout}s:\n" + localfed._tail(fed.log_path("coordinator")))
        time.sleep(0.5)


def status(fed: localfed.LocalFederation) -> dict[str, Any]:
    rc, data = admin(fed, "status")
    assert rc == 0, data
    return data


def _step_a_site_certificate_is_refused(fed: localfed.LocalFederation) -> None:
    # Execute: the site's own kit (client.pem/client.key/ca.pem) against AdminService.
    rc, data = admin(fed, "status", kit=fed.site_kits["site-a"])
    # Assert
    assert rc == 1 and data["code"] == "PERMISSION_DENIED", data
    assert "admin" in data["error"]
    # Every AdminService RPC refuses the site certificate (and nothing changes: the federation is still not started).
    kit = fed.site_kits["site-a"]
    creds = grpc.ssl_channel_credentials((kit / "ca.pem").read_bytes(), (kit / "client.key").read_bytes(),
                                         (kit / "client.pem").read_bytes())
    methods = [m.name for m in apb.DESCRIPTOR.services_by_name["AdminService"].methods]
    assert len(methods) == 11
    with grpc.secure_channel(f"127.0.0.1:{fed.port}", creds) as ch:
        stub = apb_grpc.AdminServiceStub(ch)
        for m in methods:
            with pytest.raises(grpc.RpcError) as e:
                out = getattr(stub, m)(getattr(apb, f"{m}Request")(), timeout=30)
                list(out) if m == "WithdrawSite" else out
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, m
    assert admin(fed, "status")[1]["state"] == "not_started"


def _step_not_started_offers_no_task_until_start(fed: localfed.LocalFederation) -> None:
    # Prepare: both sites joined and are polling.
    wait_for("both sites joined", lambda: len(admin(fed, "sites")[1]) == 2, 120, fed)
    time.sleep(3)
    # Execute / Assert: no task was handed out, so round 1 holds no update.
    st = status(fed)
    assert (st["state"], st["current_round"], st["round_state"], st["round_updates"]) == ("not_started", 1, "open", 0)
    rc, data = admin(fed, "start")
    assert rc == 0 and data == {"state": "running"}
    wait_for("round 2 opened", lambda: status(fed)["current_round"] >= 2, 300, fed)


def _step_pause_holds_the_round_and_resume_continues(fed: localfed.LocalFederation) -> None:
    # Execute: pause while the federation runs (rounds take ~2 s here, so wherever it is: usually round 2).
    rc, data = admin(fed, "pause")
    assert rc == 0 and data == {"state": "paused"}
    held = status(fed)
    assert held["state"] == "paused" and 2 <= held["current_round"] < ROUNDS, held
    # Assert: uploads already under way may land and a round already closing finishes, but no round opens.
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline and status(fed)["round_updates"] < 2 and status(fed)["round_state"] == "open":
        time.sleep(1)
    time.sleep(3)
    st = status(fed)
    assert (st["state"], st["current_round"]) == ("paused", held["current_round"]), st
    assert st["round_state"] in ("open", "closed"), st
    time.sleep(2)
    assert status(fed)["current_round"] == held["current_round"]
    # Execute / Assert: resume, and the federation moves on to the next round.
    rc, data = admin(fed, "resume")
    assert rc == 0 and data == {"state": "running"}
    # ">=": rounds take ~2 s and each probe is a CLI process of about as long, so the probe can miss the one round
    # right after the held one (it did: held at 5, the next probe saw 7 and then 10 until the 300 s ran out).
    wait_for("the next round opened", lambda: status(fed)["current_round"] > held["current_round"], 300, fed)



def _step_stop_tells_sites_they_are_done(fed: localfed.LocalFederation) -> tuple[int, int]:
    """Returns (the round the federation stopped in, the last closed round)."""
    # Prepare: hold the federation wherever it is (rounds take ~2 s here): mid-round, or between rounds (a round
    # closed and the next one not opened, since a paused federation does not advance).
    assert admin(fed, "pause")[1] == {"state": "paused"}
    held = status(fed)
    assert 3 <= held["current_round"] <= ROUNDS and (held["round_state"], held["current_round"]) != ("closed", ROUNDS)
    # Execute
    rc, data = admin(fed, "stop")
    # Assert: the site agents exit cleanly, the federation does not move on (an open round is never aggregated), and
    # the coordinator stays up.
    assert rc == 0 and data == {"state": "stopped"}
    codes = fed.wait([s.name for s in fed.sites], timeout=300)
    assert codes == {"site-a": 0, "site-b": 0}, localfed._tail(fed.log_path("site-a"))
    time.sleep(2)
    st = status(fed)
    assert (st["state"], st["current_round"], st["round_state"]) == ("stopped", held["current_round"],
                                                                     held["round_state"])
    rc, data = admin(fed, "start")
    assert rc == 1 and data["code"] == "FAILED_PRECONDITION"
    return held["current_round"], held["current_round"] - (held["round_state"] == "open")


def _step_rounds_sites_evals(fed: localfed.LocalFederation, last: int, last_closed: int) -> None:
    # Execute
    rc_r, rounds = admin(fed, "rounds")
    rc_s, sites = admin(fed, "sites")
    rc_e, evals = admin(fed, "evals")
    rc_h, human = admin(fed, "rounds", as_json=False)
    # Assert
    assert rc_r == rc_s == rc_e == rc_h == 0
    assert [(r["round"], r["state"]) for r in rounds] == ([(r, "closed") for r in range(1, last_closed + 1)]
                                                          + ([(last, "open")] if last > last_closed else []))
    closed = rounds[:last_closed]
    assert all(r["sites"] == ["site-a", "site-b"] for r in closed)
    assert all(r["train_loss"] > 0 and r["aggregation_error_mean"] >= 0 and len(r["output_sha256"]) == 64
               for r in closed)
    store = Store(fed.state_dir)
    assert [r["output_sha256"] for r in closed] == [r.output_sha256 for r in store.rounds()[:last_closed]]
    assert [s["name"] for s in sites] == ["site-a", "site-b"]
    assert [s["region"] for s in sites] == ["EU/DE", ""]
    assert all(s["updates"] == len([u for u in store.updates() if u.site == s["name"]]) >= 2 for s in sites)
    assert all(s["epsilon_spent"] == 0.0 and s["last_seen_ms"] > 0 for s in sites)
    assert evals == []  # this federation configures no shared evaluation
    assert "rounds" in human and "site-a, site-b" in human


def _step_publish_then_withdraw_site(fed: localfed.LocalFederation, last_closed: int) -> None:
    # Execute: publish the latest closed round's output.
    rc, pub = admin(fed, "publish")
    assert rc == 0, pub
    assert pub["published"] and (pub["round"], pub["version"]) == (last_closed, 1) and Path(pub["path"]).is_dir()
    # Execute: withdraw site-b.
    rc, wd = admin(fed, "withdraw-site", "site-b", "--reason", "test")
    # Assert: every closed round rebuilt from site-a's stored deltas alone: init + a1 + a2 + ... (FedAvg of one site).
    assert rc == 0, wd
    assert wd["published"] and (wd["from_round"], wd["to_round"], wd["version"]) == (1, last_closed, 2)
    store = Store(fed.state_dir)
    state = tensors.decode_state(store.adapter_path(1).read_bytes())
    a = [tensors.decode_state(u.path.read_bytes()) for u in store.updates()
         if u.site == "site-a" and u.round <= last_closed]
    assert len(a) == last_closed
    got = load_file(str(Path(wd["path"]) / "adapter" / "adapter_model.safetensors"))
    for k, v in state.items():
        assert torch.allclose(got[k].double(), v.double() + sum(d[k].double() for d in a), atol=1e-6), k
    prov = json.loads((Path(wd["path"]) / "provenance.json").read_text())
    assert prov["withdrawal"]["site"] == "site-b" and prov["sites"] == ["site-a"]
    # Execute / Assert: the human form (rich progress on stderr, a sentence on stdout) withdraws site-a too.
    rc, text = admin(fed, "withdraw-site", "site-a", as_json=False)
    assert rc == 0 and "withdrew site-a" in text and "v3" in text, text
    rc, st = admin(fed, "status")
    assert st["latest_version"] == 3


def _step_revoke_site_over_the_admin_api_refuses_its_next_call(fed: localfed.LocalFederation) -> None:
    from protos.fedbridge.v1 import federation_service_pb2 as pb
    from protos.fedbridge.v1 import federation_service_pb2_grpc as pb_grpc

    kit = fed.site_kits["site-b"]
    creds = grpc.ssl_channel_credentials((kit / "ca.pem").read_bytes(), (kit / "client.key").read_bytes(),
                                         (kit / "client.pem").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{fed.port}", creds) as ch:
        stub = pb_grpc.FederationServiceStub(ch)
        stub.Join(pb.JoinRequest(agent_version="test"), timeout=30)  # Prepare: site-b's certificate is accepted
        # Execute: revoke it through the running coordinator (no federation directory involved).
        rc, out = admin(fed, "revoke-site", "site-b", "--reason", "key leaked")
        # Assert: recorded, and the very next call on the same channel is refused.
        assert rc == 0 and out == {"coordinator": f"127.0.0.1:{fed.port}", "newly_revoked": True, "site": "site-b"}
        with pytest.raises(grpc.RpcError) as e:
            stub.Join(pb.JoinRequest(agent_version="test"), timeout=30)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in (e.value.details() or "")
    assert admin(fed, "revoke-site", "site-b")[1]["newly_revoked"] is False  # idempotent, first record kept
    assert admin(fed, "revoke-site", "site-b", kit=fed.site_kits["site-a"], as_json=False)[0] == 1  # a site cannot
    records = [json.loads(line) for line in (fed.state_dir / "audit.jsonl").read_text().splitlines()]
    assert [r["fields"]["actor"] for r in records if r["event"] == "site_revoked"] == ["admin"]


def _step_stopped_state_survives_a_restart(fed: localfed.LocalFederation, last: int) -> None:
    # Execute: SIGTERM the coordinator and start it again on the same state.
    proc = fed.procs["coordinator"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    fed.start_coordinator()
    # Assert
    st = status(fed)
    assert (st["state"], st["current_round"], st["latest_version"]) == ("stopped", last, 3)


def test_admin_commands_over_one_federation(fed: localfed.LocalFederation) -> None:
    """The whole story on one federation: each step acts on the state the previous one left."""
    # Prepare: a coordinator with autostart = false and two site agents (the fixture); nothing started yet.
    # Execute / Assert: a site certificate is refused everywhere; no task until start; then start.
    _step_a_site_certificate_is_refused(fed)
    _step_not_started_offers_no_task_until_start(fed)
    # Execute / Assert: pause holds the round, resume continues.
    _step_pause_holds_the_round_and_resume_continues(fed)
    # Execute / Assert: stop in the middle of the run; the sites are told they are done.
    last, last_closed = _step_stop_tells_sites_they_are_done(fed)
    # Execute / Assert: the read commands, then publish, withdraw-site, revoke-site and a restart on the stopped state.
    _step_rounds_sites_evals(fed, last, last_closed)
    _step_publish_then_withdraw_site(fed, last_closed)
    _step_revoke_site_over_the_admin_api_refuses_its_next_call(fed)
    _step_stopped_state_survives_a_restart(fed, last)


def test_stop_before_start_ends_the_federation_and_the_coordinator_exits(tiny_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    # Prepare: autostart = false and the default exit_when_done = true; the sites join and wait.
    fed = localfed.prepare(tmp_path, tiny_model_dir, n_sites=2, rounds=2, training={"max_steps": 2, "batch_size": 4},
                           lora={"rank": 4, "alpha": 8.0}, n_train=8, n_heldout=4)
    cfg = load_toml(fed.federation_toml)
    cfg["autostart"] = False
    fed.federation_toml.write_text(dumps(cfg))
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            fed.start_site(s)
        wait_for("both sites joined", lambda: len(admin(fed, "sites")[1]) == 2, 120, fed)
        # Execute
        rc, data = admin(fed, "stop")
        # Assert: sites are told done, score the initial global, report, and exit; then the coordinator exits 0.
        assert rc == 0 and data == {"state": "stopped"}
        codes = fed.wait([s.name for s in fed.sites] + ["coordinator"], timeout=300)
    assert codes == {"site-a": 0, "site-b": 0, "coordinator": 0}, localfed._tail(fed.log_path("coordinator"))
    store = Store(fed.state_dir)
    assert store.updates() == [] and [(r.round, r.state) for r in store.rounds()] == [(1, "open")]
    assert {m[1] for m in store.metrics(1) if m[2] == "eval_global"} == {"site-a", "site-b"}
