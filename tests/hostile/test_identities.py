"""Who may call what: identity comes only from a verified client certificate of the federation's CA."""

from __future__ import annotations

import grpc
import pytest
from attacker import Identity, assert_healthy, status_of
from conftest import REVOKED, Coordinator
from proto_client import Wire

SC = grpc.StatusCode


def test_no_client_certificate_is_refused_at_the_handshake(coord: Coordinator, wire: Wire) -> None:
    stub = wire.stub(coord.channel(None), "FederationService")
    assert status_of(stub.Join, wire.msg["JoinRequest"](), timeout=10) == SC.UNAVAILABLE
    assert_healthy(coord, wire)


def test_certificate_of_another_ca_is_refused(coord: Coordinator, wire: Wire, tmp_path) -> None:
    from coordinator.trust.pki import CertificateAuthority  # setting up the forgery, not attacking with it

    other = CertificateAuthority.create("someone else's CA")
    cert, key = other.issue("site-a", "site", region="EU-DE")
    for service, method, req in (("FederationService", "Join", "JoinRequest"),
                                 ("AdminService", "ListSites", "ListSitesRequest")):
        stub = wire.stub(coord.channel(Identity(cert, key)), service)
        assert status_of(getattr(stub, method), wire.msg[req](), timeout=10) == SC.UNAVAILABLE
    assert_healthy(coord, wire)


def test_revoked_site_is_refused_everywhere(coord: Coordinator, wire: Wire) -> None:
    ch = coord.channel(coord.site(REVOKED))
    fed = wire.stub(ch, "FederationService")  # SecAggService behind the access gate: tests/hostile/test_secagg_*
    assert status_of(fed.Join, wire.msg["JoinRequest"](), timeout=10) == SC.PERMISSION_DENIED
    assert status_of(fed.FetchTask, wire.msg["FetchTaskRequest"](wait_ms=0), timeout=10) == SC.PERMISSION_DENIED
    assert status_of(fed.Heartbeat, wire.msg["HeartbeatRequest"](round=1), timeout=10) == SC.PERMISSION_DENIED
    assert_healthy(coord, wire)


@pytest.mark.parametrize("method", ["ListSites", "GetStatus", "ListRounds", "ListEvaluations", "Start", "Pause",
                                    "Resume", "Stop", "Publish", "RevokeSite", "WithdrawSite"])
def test_site_certificate_on_the_admin_service_is_refused(coord: Coordinator, wire: Wire, method: str) -> None:
    stub = wire.stub(coord.channel(coord.site("site-a")), "AdminService")
    req = wire.msg[f"{method}Request"]
    body = req(site="site-b", reason="hostile") if method in ("RevokeSite", "WithdrawSite") else req()
    assert status_of(getattr(stub, method), body, timeout=10) == SC.PERMISSION_DENIED
    # The site-b a hostile site tried to revoke is still in.
    assert_healthy(coord, wire, "site-b")


def test_admin_certificate_is_not_a_site(coord: Coordinator, wire: Wire) -> None:
    stub = wire.stub(coord.channel(coord.admin), "FederationService")
    assert status_of(stub.Join, wire.msg["JoinRequest"](), timeout=10) == SC.PERMISSION_DENIED
    assert status_of(stub.GetUploadStatus, wire.msg["GetUploadStatusRequest"](round=1, payload_sha256="0" * 64),
                     timeout=10) == SC.PERMISSION_DENIED
    admin = wire.stub(coord.channel(coord.admin), "AdminService")
    assert len(admin.ListSites(wire.msg["ListSitesRequest"](), timeout=10).sites) >= 1
