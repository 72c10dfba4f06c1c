"""A site's certificate revoked mid-round (``fedbridge-admin revoke-site`` with the CA: the enrolment registry and
the CRL change, the running coordinator reloads them): the revoked site's next call is refused PERMISSION_DENIED
naming the revocation and it stops with that one line; nothing it sends is accepted after the revocation; the round
does not wait for it (a revoked site counts as dropped at once, as one that reported its crash) and closes with the
other site's update (``quorum.min_at_deadline = 1``); the federation publishes. (Slow.)"""

from __future__ import annotations

from pathlib import Path

import faultkit
import pytest
from b_support import assert_store_intact, store_count

from coordinator.trust.enrolment import revoke_site
from fedcommon.auditlog import read_records

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
SITES = faultkit.SITES


def test_cert_revoked_mid_round(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: CSR-enrolled sites (registry + CRL enforced); a round may close with one update once the rest dropped
    fed = faultkit.prepare(tmp_path / "fed", tiny_model_dir, csr_enrolment=True, quorum={"min_at_deadline": 1})
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            fed.start_site(s)
        faultkit.wait_until(lambda: store_count(fed.state_dir, "SELECT COUNT(*) FROM sites") == 2, fed, 300,
                            "both sites joined")

        # Execute: revoke site-b while both train (before any update is in)
        assert store_count(fed.state_dir, "SELECT COUNT(*) FROM updates") == 0
        revoke_site(fed.root / "pki", "site-b", "key leaked", ca_dir=fed.root / "ca")
        codes = fed.wait([*SITES, "coordinator"], timeout=400)

    # Assert: site-b told in one line and stopped; the round closed without it; nothing of site-b accepted
    assert codes["site-a"] == 0 and codes["coordinator"] == 0, fed.diagnostics(("coordinator", *SITES))
    assert codes["site-b"] != 0
    b = faultkit.log_text(fed, "site-b")
    assert "PERMISSION_DENIED" in b and "revoked" in b and "Traceback" not in b, b[-3000:]
    records = read_records(fed.state_dir / "audit.jsonl")
    events = [(r["event"], r["fields"].get("site")) for r in records]
    at = events.index(("site_revoked", "site-b"))
    assert ("update_accepted", "site-b") not in events, events
    assert ("access_refused", "site-b") in events[at:], events
    closed = [r["fields"] for r in records if r["event"] == "all_remaining_answered"]
    assert [(c["round"], c["sites"], c["dropped"]) for c in closed] == [(r, ["site-a"], ["site-b"]) for r in (1, 2)], closed
    assert_store_intact(fed.state_dir)
    faultkit.assert_each_update_once(fed, expected=[(1, "site-a"), (2, "site-a")])
    assert faultkit.published(fed)
