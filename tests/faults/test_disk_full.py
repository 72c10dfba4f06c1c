"""A full disk at the coordinator mid-round: each call that would store something is refused RESOURCE_EXHAUSTED
with a pause to retry after (never UNKNOWN), the coordinator logs one line naming the file and keeps serving, the
state stays intact (SQLite integrity, no torn or staged file), and once space returns the sites' retries resume
their uploads and the federation publishes the same adapter as a fault-free run; nothing is lost or counted twice.

The disk is a small tmpfs mounted as the coordinator's state dir and filled to the last byte with a filler file
once both sites have joined (they are training then); deleting the filler gives the space back (root only).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import faultkit
import pytest
from b_support import assert_store_intact, fill, store_count, tmpfs

# Slow: it is compared with the session's fault-free reference run, a second federation the default run would pay for.
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def test_coordinator_disk_full_refuses_then_carries_on(reference: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: the suite's federation, its state dir on a 16 MiB tmpfs
    fed = faultkit.prepare(tmp_path / "fed", tiny_model_dir)
    with tmpfs(fed.state_dir, "16m"):
        with fed:
            fed.start_coordinator()
            for s in fed.sites:
                fed.start_site(s)
            faultkit.wait_until(lambda: store_count(fed.state_dir, "SELECT COUNT(*) FROM sites") == 2, fed, 300,
                                "both sites joined")

            # Execute: fill the disk while the sites train; give the space back once an upload was refused for it
            filler = fill(fed.state_dir)
            faultkit.wait_until(lambda: "[FederationService.UploadUpdate] coordinator storage full"
                                in faultkit.log_text(fed, "coordinator"), fed, 300, "an upload refused for the full disk")
            assert fed.procs["coordinator"].poll() is None, fed.diagnostics()
            assert store_count(fed.state_dir, "SELECT COUNT(*) FROM updates") == 0  # refused means nothing stored
            filler.unlink()
            faultkit.finish(fed)

        # Assert: the refusal was clear at both ends; the state is intact; nothing lost or doubled; same adapter
        coord = faultkit.log_text(fed, "coordinator")
        assert re.search(r"coordinator storage full: cannot write \S+/uploads/\S+: No space left on device", coord), coord
        assert "Traceback" not in coord
        sites = "".join(faultkit.log_text(fed, s) for s in faultkit.SITES)
        assert "coordinator refused (RESOURCE_EXHAUSTED); resuming" in sites, sites
        assert_store_intact(fed.state_dir)
        faultkit.assert_each_update_once(fed)
    faultkit.assert_same_adapter(faultkit.published(fed), reference.adapter)
