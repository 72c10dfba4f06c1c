"""exit_when_done, with real processes: the coordinator exits seconds after publishing even when a site has no
held-out file (it used to wait out its 120 s drain timeout for a final report that never came), and every site
still gets its DONE and exits 0."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sandbox import localfed


@pytest.mark.slow  # about 3 minutes on two busy cores; tests/coordinator/test_exit_when_done.py is the quick variant
def test_coordinator_exits_promptly_after_publishing_with_a_site_without_heldout(tiny_model_dir: Path,
                                                                                tmp_path: Path) -> None:
    # Prepare: two sites, one round; site 2 has no held-out file
    fed = localfed.prepare(tmp_path, tiny_model_dir, n_sites=2, rounds=1, training={"max_steps": 2, "batch_size": 2},
                           lora={"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
                           n_train=8, n_heldout=4)
    a, b = fed.sites

    # Execute
    with fed:
        fed.start_coordinator()
        fed.start_site(a)
        fed.start_site(b, extra={"data": {"train": str(b.train_path)}})
        codes = fed.wait([a.name, b.name, "coordinator"], timeout=300)
        exited = time.time()

    # Assert
    assert set(codes.values()) == {0}, (codes, localfed._tail(fed.log_path("coordinator")))
    [prov_file] = fed.registry_dir.glob("*/v1/provenance.json")
    prov = json.loads(prov_file.read_text())
    after_publish = exited - prov["published_ms"] / 1000
    print(f"coordinator exited {after_publish:.1f} s after publishing")
    assert after_publish < 30, after_publish
