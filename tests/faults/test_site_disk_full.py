"""A full disk at a site mid-round: site-b's work dir is a small tmpfs, filled to the last byte once both sites have
joined. The site stops with one line naming the file it could not write (no traceback) and tells the coordinator
(ReportError); its audit log still verifies. Once space returns (the filler deleted) the site is started again, joins
again, trains the round, and the federation publishes the same adapter as a fault-free run; nothing is lost or
counted twice. Root only (mount). (Slow.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import faultkit
import pytest
from b_support import fill, store_count, tmpfs

from fedcommon.auditlog import verify

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_site_disk_full(reference: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    fed = faultkit.prepare(tmp_path / "fed", tiny_model_dir)
    work = fed.root / "sites" / "site-b" / "work"
    with tmpfs(work, "8m"):
        with fed:
            fed.start_coordinator()
            for s in fed.sites:
                fed.start_site(s)
            faultkit.wait_until(lambda: store_count(fed.state_dir, "SELECT COUNT(*) FROM sites") == 2, fed, 300,
                                "both sites joined")

            # Execute: fill site-b's disk; it stops; give the space back and start it again
            filler = fill(work)
            faultkit.wait_until(lambda: fed.procs["site-b"].poll() is not None, fed, 300, "site-b stopped",
                                may_exit=("site-b",))
            stopped_rc, first_log = fed.procs["site-b"].returncode, faultkit.log_text(fed, "site-b")
            filler.unlink()
            fed.start_site(next(s for s in fed.sites if s.name == "site-b"))
            faultkit.finish(fed, timeout=400)
        audit_ok = verify(work / "audit.jsonl").verdict

    # Assert: one clear line naming the file, no traceback; told the coordinator; then the same result as no fault
    assert stopped_rc != 0
    assert re.search(r"error: \S+/sites/site-b/work/\S*: No space left on device", first_log), first_log[-3000:]
    assert "Traceback" not in first_log
    assert "site_failed" in (fed.state_dir / "audit.jsonl").read_text()
    assert audit_ok == "OK"
    faultkit.assert_each_update_once(fed)
    faultkit.assert_same_adapter(faultkit.published(fed), reference.adapter)
