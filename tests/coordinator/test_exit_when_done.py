"""exit_when_done: the coordinator is drained as soon as every site has its DONE and said its last word, including a
site with no held-out data (which used to keep it up for the whole drain timeout)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from coord_helpers import LORA, Site, _chunks, config, small_delta

from coordinator.rounds.adapter import init_adapter
from coordinator.rounds.engine import RoundEngine
from coordinator.rounds.store import Store
from fedcommon.manifest import Manifest


def test_drained_once_every_site_has_done_and_reported_even_with_no_heldout(tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    cfg = config(tmp_path, tiny_model_dir, rounds=1, min_sites=2)
    init = init_adapter(tiny_model_dir, LORA)
    base_sha = Manifest.of_dir(tiny_model_dir).sha256
    a, b = Site("site-a"), Site("site-b")

    async def main() -> list[bool]:
        store = Store(cfg.state_dir)
        eng = RoundEngine(cfg, store, base_sha, init)
        await eng.start()
        for s in (a, b):
            eng.join(s.peer, "test", 0)
        while (cur := store.current_round()) is None or cur.state != "open":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        eng.control.pause("test")
        for i, s in enumerate((a, b)):
            signed, payload = s.update(1, small_delta(init, i), base_sha=base_sha, spec_sha=init.spec.sha256)
            assert (await eng.ingress.receive_upload(s.peer, _chunks(signed, payload))).accepted
        eng.control.resume("test")
        await asyncio.wait_for(eng.finished.wait(), 120)
        seen = [eng.drained()]  # finished and published, but no site has its DONE yet
        assert (await eng.fetch_task(a.peer, 0)).status == "done"
        eng.report_metrics(a.peer, 2, "eval_global", {"loss": 1.0}, 4)  # a site with held-out data
        seen.append(eng.drained())
        assert (await eng.fetch_task(b.peer, 0)).status == "done"
        eng.report_metrics(b.peer, 2, "eval_global", {}, 0)  # no held-out data: the empty goodbye report
        seen.append(eng.drained())
        store.close()
        return seen

    assert asyncio.run(main()) == [False, False, True]
