"""The coordinator's host restarted mid-round: every process (the coordinator and both sites, each process group)
SIGKILLed at once after the first update was accepted, the disk kept; then all started again. The federation
completes, the update accepted before the power cut is kept and not counted twice, and the published adapter equals
that of a fault-free run. (Slow: three extra process starts, each importing torch.)"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import faultkit
import pytest
from b_support import assert_store_intact, kill_group, store_count

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_host_restart_keeps_state(reference: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: the kill lands with one update held and the other site still at work
    fed = faultkit.prepare(tmp_path / "fed", tiny_model_dir)
    with fed:
        fed.start_coordinator()
        fed.pin_port()  # the restarted host listens where the sites' configs point
        for s in fed.sites:
            fed.start_site(s)
        faultkit.wait_until(lambda: store_count(fed.state_dir, "SELECT COUNT(*) FROM updates") >= 1, fed, 300,
                            "one update accepted")

        # Execute: the power cut: every process group killed at once, nothing shut down cleanly
        held = store_count(fed.state_dir, "SELECT COUNT(*) FROM updates")
        killed = tuple(p.pid for p in fed.procs.values())
        for proc in fed.procs.values():
            kill_group(proc)
        assert all(p.returncode == -signal.SIGKILL for p in fed.procs.values()), {
            n: p.returncode for n, p in fed.procs.items()}
        fed.start_coordinator()
        for s in fed.sites:
            fed.start_site(s)
        faultkit.finish(fed, timeout=400)

    # Assert: the updates held at the cut kept, each once; intact state; same adapter
    assert held >= 1
    assert "resuming at round" in faultkit.log_text(fed, "coordinator")
    assert_store_intact(fed.state_dir, killed_pids=killed)  # a temp file of a killed writer is debris, never read
    faultkit.assert_each_update_once(fed)
    faultkit.assert_same_adapter(faultkit.published(fed), reference.adapter)
