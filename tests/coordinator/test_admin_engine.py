"""The round engine's administration: withdraw-site rebuilds the published model from the ledger without the site;
start/pause/resume/stop gate tasks and rounds and survive a restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from coord_helpers import LORA, Site, _chunks, config, run_federation, small_delta
from safetensors.torch import load_file

from coordinator.errors import InvalidState, NotFound
from coordinator.release.modelcard import parse_model_card
from coordinator.rounds.adapter import init_adapter
from coordinator.rounds.engine import RoundEngine
from coordinator.rounds.store import Store
from fedcommon import tensors
from fedcommon.manifest import Manifest
from protos import codec


def _deltas(init, rounds: dict[int, list[str]]) -> dict[int, dict[str, dict[str, torch.Tensor]]]:  # type: ignore[no-untyped-def]
    return {r: {s: small_delta(init, seed=10 * r + ord(s[-1])) for s in sites} for r, sites in rounds.items()}


def test_withdraw_site_republishes_fedavg_of_the_remaining_sites(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: site-b joins in round 2; three rounds of FedAvg with equal weights (10 examples each).
    init = init_adapter(tiny_model_dir, LORA)
    cfg = config(tmp_path, tiny_model_dir, rounds=3, min_sites=2,
                 lora={"rank": 16, "alpha": 32.0, "target_modules": ["all-linear"]})
    deltas = _deltas(init, {1: ["site-a", "site-c"], 2: ["site-a", "site-b", "site-c"], 3: ["site-a", "site-b", "site-c"]})
    store = run_federation(cfg, init, deltas)
    assert [p["version"] for p in store.publications()] == [1]
    base_sha = Manifest.of_dir(tiny_model_dir).sha256
    seen: list[tuple[int, int]] = []

    # Execute: a restarted engine withdraws site-b.
    async def main() -> dict:
        eng = RoundEngine(cfg, store, base_sha, init)
        await eng.start()
        return await eng.control.withdraw_site("site-b", "consent withdrawn", "tester", lambda d, t: seen.append((d, t)))

    out = asyncio.run(main())

    # Assert: the new version is init + mean(a1, c1) + mean(a2, c2) + mean(a3, c3), worked out here by hand.
    assert out["published"] and out["version"] == 2 and (out["from_round"], out["to_round"]) == (2, 3)
    assert seen == [(1, 2), (2, 2)]
    path = Path(out["path"])
    got = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    for k, v in init.state.items():
        want = v.double() + sum((deltas[r]["site-a"][k].double() + deltas[r]["site-c"][k].double()) / 2 for r in (1, 2, 3))
        assert torch.allclose(got[k].double(), want, atol=1e-6), k
    # ... and differs from the published v1, which had site-b in it.
    v1 = load_file(str(Path(store.publications()[0]["path"]) / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.allclose(v1[k], got[k]) for k in got)
    assert codec.sha256_hex(tensors.encode_state(got)) == out["global_sha256"]
    prov = json.loads((path / "provenance.json").read_text())
    assert prov["withdrawal"]["site"] == "site-b" and prov["withdrawal"]["from_round"] == 2
    assert prov["withdrawal"]["reason"] == "consent withdrawn" and prov["withdrawal"]["actor"] == "tester"
    assert prov["sites"] == ["site-a", "site-c"]
    assert all(u["site"] != "site-b" for e in prov["ledger"] for u in e["updates"])
    rounds = {r["round"]: r for r in prov["withdrawal"]["rounds"]}
    assert rounds[2]["sites"] == ["site-a", "site-c"] and rounds[2]["output_sha256"] != rounds[2]["original_output_sha256"]
    meta, body = parse_model_card((path / "README.md").read_text())
    assert meta["fedbridge"]["withdrawal"] == {"site": "site-b", "from_round": 2, "to_round": 3}
    assert "## Withdrawn site" in body and "retrain" in body


def test_withdraw_unknown_site_is_not_found(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    init = init_adapter(tiny_model_dir, LORA)
    cfg = config(tmp_path, tiny_model_dir, rounds=1, min_sites=1)
    store = run_federation(cfg, init, _deltas(init, {1: ["site-a"]}))

    async def main() -> None:
        eng = RoundEngine(cfg, store, Manifest.of_dir(tiny_model_dir).sha256, init)
        await eng.start()
        await eng.control.withdraw_site("site-z")

    # Execute / Assert
    with pytest.raises(NotFound, match="site-z"):
        asyncio.run(main())


def test_control_gates_tasks_and_rounds_and_survives_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: a federation created with autostart = false; one site, quorum 1, two rounds.
    init = init_adapter(tiny_model_dir, LORA)
    cfg = config(tmp_path, tiny_model_dir, rounds=2, min_sites=1, autostart=False)
    base_sha = Manifest.of_dir(tiny_model_dir).sha256
    site = Site("site-a")

    async def upload(eng: RoundEngine, round: int) -> None:
        signed, payload = site.update(round, small_delta(init, round), base_sha=base_sha, spec_sha=init.spec.sha256)
        assert (await eng.ingress.receive_upload(site.peer, _chunks(signed, payload))).accepted

    async def first_run() -> None:
        store = Store(cfg.state_dir)
        eng = RoundEngine(cfg, store, base_sha, init)
        await eng.start()
        # Execute / Assert: not started -> no task.
        assert eng.control.control_state() == "not_started"
        assert (await eng.fetch_task(site.peer, 0)).status == "wait"
        with pytest.raises(InvalidState):
            eng.control.pause()
        assert eng.control.begin() == "running"
        offer = await eng.fetch_task(site.peer, 0)
        assert (offer.status, offer.round) == ("train", 1)
        # Paused: no new task, but the upload of the task already handed out lands; the round does not close.
        assert eng.control.pause() == "paused"
        assert (await eng.fetch_task(site.peer, 0)).status == "wait"
        await upload(eng, 1)
        await asyncio.sleep(0.5)
        assert [(r.round, r.state) for r in store.rounds()] == [(1, "open")]
        assert len(store.updates(1)) == 1
        store.close()

    async def second_run() -> None:
        store = Store(cfg.state_dir)
        eng = RoundEngine(cfg, store, base_sha, init)
        await eng.start()
        # Paused survives the restart; resume closes round 1 and opens round 2.
        assert eng.control.control_state() == "paused"
        assert eng.control.resume() == "running"
        for _ in range(100):
            if store.current_round().round == 2:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.05)
        assert [(r.round, r.state) for r in store.rounds()] == [(1, "closed"), (2, "open")]
        # Stop: the site is told the federation is done, with round 1's output as the latest global.
        assert eng.control.stop() == "stopped"
        offer = await eng.fetch_task(site.peer, 0)
        assert (offer.status, offer.round) == ("done", 2)
        assert offer.global_sha256 == store.rounds()[0].output_sha256
        with pytest.raises(InvalidState):
            eng.control.begin()
        store.close()

    async def third_run() -> None:
        store = Store(cfg.state_dir)
        eng = RoundEngine(cfg, store, base_sha, init)
        await eng.start()
        assert eng.control.control_state() == "stopped" and eng.finished.is_set()
        assert [(r.round, r.state) for r in store.rounds()] == [(1, "closed"), (2, "open")]
        store.close()

    asyncio.run(first_run())
    asyncio.run(second_run())
    asyncio.run(third_run())


def test_withdraw_under_central_dp_renoises_and_composes_epsilon(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: central DP (sigma 1.5, C 0.1), three sites, two rounds.
    from fedcommon.dp import rdp_epsilon

    init = init_adapter(tiny_model_dir, LORA)
    cfg = config(tmp_path, tiny_model_dir, rounds=2, min_sites=3,
                 lora={"rank": 16, "alpha": 32.0, "target_modules": ["all-linear"]},
                 privacy={"mode": "central", "noise_multiplier": 1.5, "clip_norm": 0.1, "delta": 1e-6})
    store = run_federation(cfg, init, _deltas(init, {r: ["site-a", "site-b", "site-c"] for r in (1, 2)}))

    async def main() -> dict:
        eng = RoundEngine(cfg, store, Manifest.of_dir(tiny_model_dir).sha256, init)
        await eng.start()
        return await eng.control.withdraw_site("site-c")

    # Execute
    out = asyncio.run(main())

    # Assert: both rounds were clipped and noised again (std sigma*C/2 over the 2 remaining sites), and the
    # published epsilon composes the 2 original releases with the 2 new ones.
    prov = json.loads((Path(out["path"]) / "provenance.json").read_text())
    redone = [r["dp"] for r in prov["withdrawal"]["rounds"]]
    assert [d["num_updates"] for d in redone] == [2, 2]
    assert all(d["noise_std"] == pytest.approx(1.5 * 0.1 / 2) for d in redone)
    central = prov["privacy"]["central"]
    assert central["rounds"] == 4
    assert central["epsilon"] == pytest.approx(rdp_epsilon([(1.5, 1.0, 4)], 1e-6))
    assert central["epsilon"] > store.rounds()[-1].info["dp"]["epsilon"]
    assert set(prov["privacy"]["epsilon"]) == {"site-a", "site-b"}


def test_withdraw_is_refused_under_secure_aggregation(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: a federation configured for secure aggregation (the store would hold masked updates only).
    init = init_adapter(tiny_model_dir, LORA)
    cfg = config(tmp_path, tiny_model_dir, rounds=1, min_sites=3, secure_aggregation={"enabled": True})

    async def main() -> None:
        eng = RoundEngine(cfg, Store(cfg.state_dir), Manifest.of_dir(tiny_model_dir).sha256, init)
        await eng.control.withdraw_site("site-a")

    # Execute / Assert
    with pytest.raises(InvalidState, match="secure aggregation: the coordinator holds only masked updates"):
        asyncio.run(main())
