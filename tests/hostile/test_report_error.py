"""ReportError, the site's own crash report: behind the same access gate as every FederationService RPC (identity
from the certificate only), and bounded: one short printable line with a class name, else refused whole and nothing
recorded. A site that reports in a loop adds one audit record, not one per call."""

from __future__ import annotations

import grpc
from attacker import assert_healthy, status_of
from conftest import REVOKED, Coordinator
from proto_client import Wire

SC = grpc.StatusCode
OWN = "site-i"  # this file's site (one site per concern on the shared coordinator)


def _failed_records(coord: Coordinator, site: str) -> list[dict]:
    return [r["fields"] for r in coord.audit() if r["event"] == "site_failed" and r["fields"].get("site") == site]


def test_bad_reports_are_refused_and_nothing_is_recorded(coord: Coordinator, wire: Wire) -> None:
    stub = wire.stub(coord.channel(coord.site(OWN)), "FederationService")
    req = wire.msg["ReportErrorRequest"]
    bad = {"oversized message": req(round=1, phase="train", error_type="RuntimeError", message="x" * 201),
           "line break": req(round=1, phase="train", error_type="RuntimeError", message="one\nTraceback (most recent"),
           "control character": req(round=1, phase="train", error_type="RuntimeError", message="a\x1b[2Jb"),
           "not a class name": req(round=1, phase="train", error_type="Runtime Error; rm -rf", message="m"),
           "empty class name": req(round=1, phase="train", message="m"),
           "long class name": req(round=1, phase="train", error_type="E" * 65, message="m"),
           "bad phase": req(round=1, phase="Train!", error_type="RuntimeError", message="m"),
           "round past the end": req(round=4, phase="train", error_type="RuntimeError", message="m")}
    got = {k: status_of(stub.ReportError, r, timeout=10) for k, r in bad.items()}
    assert got == {k: SC.INVALID_ARGUMENT for k in bad}
    assert _failed_records(coord, OWN) == []
    assert "Traceback" not in coord.log_text()
    assert_healthy(coord, wire)


def test_revoked_site_and_admin_certificate_are_refused(coord: Coordinator, wire: Wire) -> None:
    req = wire.msg["ReportErrorRequest"](round=1, phase="train", error_type="RuntimeError", message="hostile")
    revoked = wire.stub(coord.channel(coord.site(REVOKED)), "FederationService")
    assert status_of(revoked.ReportError, req, timeout=10) == SC.PERMISSION_DENIED
    admin = wire.stub(coord.channel(coord.admin), "FederationService")
    assert status_of(admin.ReportError, req, timeout=10) == SC.PERMISSION_DENIED
    assert _failed_records(coord, REVOKED) == [] and _failed_records(coord, "admin") == []
    assert_healthy(coord, wire)


def test_a_report_in_a_loop_is_recorded_once_until_the_site_joins_again(coord: Coordinator, wire: Wire) -> None:
    stub = wire.stub(coord.channel(coord.site(OWN)), "FederationService")
    stub.Join(wire.msg["JoinRequest"](agent_version="hostile-suite"), timeout=10)
    for i in range(20):
        stub.ReportError(wire.msg["ReportErrorRequest"](round=1, phase="train", error_type="RuntimeError",
                                                        message=f"flood {i}"), timeout=10)
    recs = _failed_records(coord, OWN)
    assert [r["error"] for r in recs] == ["RuntimeError: flood 0"]
    admin = wire.stub(coord.channel(coord.admin), "AdminService")
    mine = [s for s in admin.ListSites(wire.msg["ListSitesRequest"](), timeout=10).sites if s.name == OWN]
    assert mine[0].status == "failed" and mine[0].problem == "failed: RuntimeError: flood 0"
    assert f"{OWN} failed: RuntimeError: flood 0" in admin.GetStatus(wire.msg["GetStatusRequest"](), timeout=10).site_problems
    # Joining again makes it active again, recorded once
    stub.Join(wire.msg["JoinRequest"](agent_version="hostile-suite"), timeout=10)
    back = [r["fields"] for r in coord.audit() if r["event"] == "site_back" and r["fields"].get("site") == OWN]
    assert [r["was"] for r in back] == ["failed"]
    mine = [s for s in admin.ListSites(wire.msg["ListSitesRequest"](), timeout=10).sites if s.name == OWN]
    assert mine[0].status == "active" and mine[0].problem == ""
