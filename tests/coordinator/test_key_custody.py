"""Key custody: keys 0600 from creation, the CA key never beside the coordinator, renewal and expiry, admin revocation,
and the fsync of the CRL and of published files."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import ssl
import time
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from live_coordinator import LiveCoordinator

from coordinator.config import DashboardSpec, load_federation_config
from coordinator.trust import enrolment as en
from coordinator.trust.pki import CertificateAuthority, create_dev_pki, write_crl
from fedcommon import csr as fcsr
from fedcommon.durable import write_private
from protos.fedbridge.v1 import admin_service_pb2 as apb
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent.enrol import install_bundle, renew_site

SC = grpc.StatusCode


# -- files ----------------------------------------------------------------------------------------------------------
def test_private_keys_are_0600_from_creation_never_chmod_ed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: chmod would mean the key existed with a wider mode first; record how every file is opened
    def no_chmod(*a: object, **k: object) -> None:
        raise AssertionError(f"chmod called on {a[:1]}: a private key must be created 0600, not chmod-ed later")

    opened: dict[str, tuple[int, int]] = {}
    real_open = os.open

    def spy_open(path, flags, mode=0o777, *a, **k):  # type: ignore[no-untyped-def]
        opened[os.fspath(path)] = (flags, mode)
        return real_open(path, flags, mode, *a, **k)

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    monkeypatch.setattr(os, "open", spy_open)
    umask = os.umask(0o022)  # a usual umask: write_bytes would make 0644 files
    try:  # Execute: every place that makes a private key
        pki = create_dev_pki(tmp_path / "pki", ["s1"])
        fcsr.make_request(tmp_path / "kit", "s2", "site", signing=True)
        CertificateAuthority.create().save(tmp_path / "ca2" / "ca.pem", tmp_path / "ca2" / "ca.key")
    finally:
        os.umask(umask)
    # Assert
    keys = [pki.server_key, pki.admin_key, pki.sites["s1"].key, pki.sites["s1"].signing_key,
            tmp_path / "pki" / "ca" / "ca.key", tmp_path / "kit" / "client.key", tmp_path / "kit" / "signing.key",
            tmp_path / "ca2" / "ca.key"]
    for k in keys:
        assert k.stat().st_mode & 0o777 == 0o600, k
        flags, mode = opened[str(k)]
        assert flags & os.O_CREAT and flags & os.O_EXCL and mode == 0o600, (k, oct(flags), oct(mode))
    with pytest.raises(FileExistsError):  # never overwritten (nor a planted file or link followed)
        write_private(tmp_path / "kit" / "client.key", b"x")
    assert not (tmp_path / "ca" / "ca.key").exists() and (tmp_path / "pki" / "README.txt").read_text().startswith(
        "DEVELOPMENT PKI")


def _fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_crl_is_fsynced_file_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = CertificateAuthority.create()
    seen = _fsynced(monkeypatch)
    write_crl(ca, {7: dt.datetime.now(dt.timezone.utc)}, tmp_path / "fed" / "crl.pem")
    assert any("crl.pem" in s and Path(s).parent == tmp_path / "fed" for s in seen), seen
    assert str(tmp_path / "fed") in seen, seen


def test_published_files_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.release import publish

    (tmp_path / "v" / "adapter").mkdir(parents=True)
    (tmp_path / "v" / "adapter" / "adapter_model.safetensors").write_bytes(b"w")
    seen = _fsynced(monkeypatch)
    publish.write_sha256sums(tmp_path / "v")
    publish.fsync_tree(tmp_path / "v")
    assert any(Path(s).parent == tmp_path / "v" and "SHA256SUMS" in s for s in seen), seen
    assert str(tmp_path / "v" / "adapter" / "adapter_model.safetensors") in seen
    assert str(tmp_path / "v" / "adapter") in seen and str(tmp_path / "v") in seen


# -- the CA key is never where the coordinator runs ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ca.key", "backup-of-something.pem"])
def test_coordinator_refuses_to_start_next_to_the_ca_key(tmp_path: Path, tiny_model_dir: Path, name: str) -> None:
    # Prepare: a real federation; the CA key copied into the coordinator's folder (by name or in disguise)
    from coordinator.server import CAKeyPresent, serve

    fed = tmp_path / "fed"
    en.init_federation(fed, en.InitOptions(federation_id="f", base_model=tiny_model_dir, hosts=("127.0.0.1",),
                                           listen="127.0.0.1:0"))
    shutil.copy(tmp_path / "fed-ca" / "ca.key", fed / name)
    cfg = load_federation_config(fed / "federation.toml")
    stop = asyncio.Event()
    stop.set()  # without the check, serve would start and stop at once, raising nothing
    # Execute / Assert
    with pytest.raises(CAKeyPresent, match=name):
        asyncio.run(serve(cfg, stop))
    assert not (fed / "state" / "coordinator.port").exists()


# -- a live coordinator: renewal, expiry, admin revocation ----------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> LiveCoordinator:
    lc = LiveCoordinator(tmp_path_factory.mktemp("custody"), sites=("site-a", "site-b"))
    # no CA key anywhere the coordinator reads: its TLS folder, its registry/CRL folder, its state
    from coordinator.server import refuse_ca_key

    refuse_ca_key(lc.cfg)
    yield lc
    lc.close()


def _refused(fn) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def test_renewal_before_expiry_is_accepted_without_a_restart(live: LiveCoordinator) -> None:
    # Prepare
    kit = live.kits["site-a"]
    old_pem = (kit / "client.pem").read_bytes()
    assert live.site_stub("site-a").Join(pb.JoinRequest(agent_version="t"), timeout=10).site == "site-a"
    # Execute: site renew -> CA renew-site -> site install, while the coordinator keeps running
    entry, bundle = en.renew_csr(live.fed, live.ca_dir, renew_site(kit).read_bytes())
    (kit / "renewal.json").write_bytes(bundle)
    install_bundle(kit, kit / "renewal.json")
    # Assert: the new certificate is accepted at once (the registry reload), and so is the old one until it expires
    assert (kit / "client.pem").read_bytes() != old_pem and entry.previous_fingerprint
    deadline = time.monotonic() + 5
    while True:
        try:
            assert live.site_stub("site-a").Join(pb.JoinRequest(agent_version="t"), timeout=10).site == "site-a"
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    (kit / "old.pem").write_bytes(old_pem)
    assert live.stub(kit / "old.pem", kit / "client.key").Join(pb.JoinRequest(), timeout=10).site == "site-a"
    # a renewal with other keys is refused: renewal keeps the keys
    other = fcsr.make_request(live.root / "thief", "site-a", "site", signing=True)
    with pytest.raises(en.EnrolmentError, match="not the ones enrolled"):
        en.renew_csr(live.fed, live.ca_dir, other.read_bytes())


def test_an_expired_certificate_is_refused(live: LiveCoordinator, tmp_path: Path) -> None:
    # Prepare: site-b's own keys, but a certificate that expired yesterday (and the registry pinned to it)
    kit = live.kits["site-b"]
    key = serialization.load_pem_private_key((kit / "client.key").read_bytes(), password=None)
    ident = x509.load_pem_x509_certificate((kit / "client.pem").read_bytes())
    ca = CertificateAuthority.load(live.ca_dir / "ca.pem", live.ca_dir / "ca.key")
    from fedcommon.certs import identity

    expired = ca.certificate("site-b", "site", key.public_key(), signing_key=identity(ident).signing_key,  # type: ignore[arg-type]
                             region="EU-FR", days=1, not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3))
    (tmp_path / "expired.pem").write_bytes(expired)
    # Execute / Assert: the TLS handshake refuses it before any call runs
    err = _refused(lambda: live.stub(tmp_path / "expired.pem", kit / "client.key").Join(pb.JoinRequest(), timeout=10))
    assert err.code() == SC.UNAVAILABLE
    # ... and the CA will not renew a certificate the registry says has expired
    reg = en.load_full_registry(live.fed / "enrolment.json")
    reg.sites["site-b"] = en.Enrolment(**{**reg.sites["site-b"].__dict__, "not_after_ms": 1})
    en.save_registry(live.fed / "enrolment.json", reg.sites, reg.admins)
    with pytest.raises(en.EnrolmentError, match="has expired"):
        en.renew_csr(live.fed, live.ca_dir, fcsr.renewal_request(kit).read_bytes())


def test_a_revoked_admin_is_refused_on_admin_service_and_the_dashboard(live: LiveCoordinator, tmp_path: Path) -> None:
    # Prepare: a second admin enrolled by CSR; a dashboard that requires admin certificates
    from coordinator.dashboard import start_dashboard

    kit = tmp_path / "ops"
    csr = fcsr.make_request(kit, "ops", "admin", signing=False)
    _, bundle = en.enroll_csr(live.fed, live.ca_dir, csr.read_bytes(), role="admin")
    (kit / "b.json").write_bytes(bundle)
    fcsr.install_certificate(kit, kit / "b.json")
    dash = live.run(start_dashboard(DashboardSpec(listen="127.0.0.1:0", require_admin_cert=True), live.engine,
                                    live.cfg.tls, tmp_path))

    def dashboard_status(k: Path) -> int:
        ctx = ssl.create_default_context(cafile=str(live.fed / "ca.pem"))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(k / "client.pem"), str(k / "client.key"))
        try:
            with httpx.Client(verify=ctx, timeout=10) as c:
                return c.get(f"https://127.0.0.1:{dash.port}/api/status").status_code
        except httpx.HTTPError:
            return 0  # connection closed: refused

    try:
        assert live.admin_stub(kit).GetStatus(apb.GetStatusRequest(), timeout=10).federation_id == "fed"
        assert dashboard_status(kit) == 200
        # Execute
        en.revoke(live.fed, live.ca_dir, "ops", "laptop stolen", role="admin")
        # Assert: refused on both, while the CA holder's own admin still works
        err = _refused(lambda: live.admin_stub(kit).GetStatus(apb.GetStatusRequest(), timeout=10))
        assert err.code() == SC.PERMISSION_DENIED and "revoked" in (err.details() or "")
        assert dashboard_status(kit) == 0
        assert live.admin_stub(live.ca_dir / "admin").GetStatus(apb.GetStatusRequest(), timeout=10).federation_id
        assert dashboard_status(live.ca_dir / "admin") == 200
        assert any(r["event"] == "admin_refused" and r["fields"]["admin"] == "ops" for r in live.audit_records())
    finally:
        live.run(dash.stop())
