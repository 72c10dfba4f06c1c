"""Under ``[privacy] mode = "local"`` the coordinator refuses an update whose signed envelope declares no DP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from coord_helpers import Site, _chunks, config, small_delta

from coordinator.config import LoraSpec
from coordinator.errors import InvalidUpdate
from coordinator.rounds.adapter import init_adapter
from coordinator.rounds.engine import RoundEngine
from coordinator.rounds.store import Store
from fedcommon.manifest import Manifest


def test_local_dp_federation_refuses_an_update_without_declared_noise(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    init = init_adapter(tiny_model_dir, LoraSpec(rank=2, alpha=4.0, target_modules=("q_proj",)))
    cfg = config(tmp_path, tiny_model_dir, rounds=1, min_sites=2, lora={"rank": 2, "alpha": 4.0, "target_modules": ["q_proj"]},
                 privacy={"mode": "local", "noise_multiplier": 1.0, "clip_norm": 1.0})
    base_sha = Manifest.of_dir(tiny_model_dir).sha256
    plain, noised = Site("site-a"), Site("site-b")

    async def main() -> None:
        store = Store(cfg.state_dir)
        eng = RoundEngine(cfg, store, base_sha, init)
        await eng.start()
        # Execute / Assert: no declared epsilon -> refused, nothing stored; a declared one is accepted.
        signed, payload = plain.update(1, small_delta(init, 1), base_sha=base_sha, spec_sha=init.spec.sha256)
        with pytest.raises(InvalidUpdate, match="local differential privacy"):
            await eng.ingress.receive_upload(plain.peer, _chunks(signed, payload))
        assert store.updates(1) == []
        signed, payload = noised.update(1, small_delta(init, 1), base_sha=base_sha, spec_sha=init.spec.sha256,
                                        epsilon=0.7)
        assert (await eng.ingress.receive_upload(noised.peer, _chunks(signed, payload))).accepted
        assert [u.site for u in store.updates(1)] == ["site-b"]
        store.close()

    asyncio.run(main())
