"""The coordinator speaks only mutual TLS, reads identity from the certificate, and its audit tap sees all bytes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from coordinator.server import read_recording
from coordinator.trust.pki import create_dev_pki
from protos.fedbridge.v1 import federation_service_pb2 as pb
from protos.fedbridge.v1 import federation_service_pb2_grpc as pb_grpc
from sandbox import localfed


@pytest.fixture(scope="module")
def coordinator(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[localfed.LocalFederation]:
    fed = localfed.prepare(tmp_path_factory.mktemp("mtls"), tiny_model_dir, n_sites=1, rounds=1,
                           record_inbound=True, n_train=4, n_heldout=2)
    with fed:
        fed.start_coordinator()
        yield fed


def _stub(fed: localfed.LocalFederation, ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
          server_name: str = "") -> pb_grpc.FederationServiceStub:
    creds = grpc.ssl_channel_credentials(root_certificates=(ca or fed.root / "pki" / "ca.pem").read_bytes(),
                                         private_key=key.read_bytes() if key else None,
                                         certificate_chain=cert.read_bytes() if cert else None)
    opts = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return pb_grpc.FederationServiceStub(grpc.secure_channel(f"127.0.0.1:{fed.port}", creds, options=opts))


def _kit(fed: localfed.LocalFederation) -> Path:
    return fed.site_kits["site-a"]


def test_enrolled_site_is_identified_by_its_certificate(coordinator: localfed.LocalFederation) -> None:
    kit = _kit(coordinator)
    resp = _stub(coordinator, cert=kit / "client.pem", key=kit / "client.key").Join(pb.JoinRequest(agent_version="t"),
                                                                                     timeout=10)
    assert resp.site == "site-a" and resp.federation_id == "demo"


def test_client_without_certificate_is_refused(coordinator: localfed.LocalFederation) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _stub(coordinator).Join(pb.JoinRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails


def test_certificate_from_another_ca_is_refused(coordinator: localfed.LocalFederation, tmp_path: Path) -> None:
    other = create_dev_pki(tmp_path / "other", ["site-a"])  # same name, foreign CA
    kit = other.sites["site-a"]
    with pytest.raises(grpc.RpcError) as e:
        _stub(coordinator, cert=kit.cert, key=kit.key).Join(pb.JoinRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_coordinator_certificate_must_match_the_host(coordinator: localfed.LocalFederation) -> None:
    kit = _kit(coordinator)
    with pytest.raises(grpc.RpcError) as e:
        _stub(coordinator, cert=kit / "client.pem", key=kit / "client.key",
              server_name="coordinator.evil.example").Join(pb.JoinRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_admin_certificate_cannot_act_as_a_site(coordinator: localfed.LocalFederation) -> None:
    pki = coordinator.root / "pki" / "admin"
    with pytest.raises(grpc.RpcError) as e:
        _stub(coordinator, cert=pki / "admin.pem", key=pki / "admin.key").Join(pb.JoinRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_inbound_recorder_sees_what_a_site_sends(coordinator: localfed.LocalFederation) -> None:
    """Positive control for the canary test: a marker that IS sent shows up in the recording."""
    kit = _kit(coordinator)
    marker = "CONTROL-MARKER-31337"
    with pytest.raises(grpc.RpcError) as e:  # refused (bad metric name) but its bytes did arrive
        _stub(coordinator, cert=kit / "client.pem", key=kit / "client.key").ReportMetrics(
            pb.ReportMetricsRequest(round=1, phase="train", metrics={marker: 1.0}), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert coordinator.record_inbound is not None
    assert any(marker.encode() in raw for _, raw in read_recording(coordinator.record_inbound))
