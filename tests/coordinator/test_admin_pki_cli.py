"""``fedbridge-admin`` init / enroll-site / revoke-site / export-records / audit verify, run as the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from live_coordinator import LiveCoordinator, delta, upload_messages

from coordinator.config import load_federation_config
from coordinator.trust.enrolment import EnrolmentError, InitOptions, enroll_csr, init_federation
from coordinator.trust.pki import cert_identity, load_crl
from fedcommon.certs import ca_sha256
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent.config import load_site_config
from site_agent.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]


def admin(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


@pytest.fixture
def fed(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A fresh federation directory per test: enrol/revoke tests change it, so none may see another's sites."""
    root = tmp_path
    shutil.copytree(tiny_model_dir, root / "base")  # init resolves the LoRA targets and the template against it
    r = admin("init", "--dir", root / "fed", "--federation-id", "consortium", "--base-model", root / "base",
              "--host", "fl.example.org", "--host", "127.0.0.1", "--port", "7443", "--max-update-norm", "10")
    assert r.returncode == 0, r.stderr
    return root / "fed"


@pytest.fixture(scope="module")
def fed_inproc(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A federation made in-process (fast): for the CSR-refusal cases, which must leave it unchanged."""
    root = tmp_path_factory.mktemp("inproc")
    init_federation(root / "fed", InitOptions(federation_id="c", base_model=tiny_model_dir, hosts=("127.0.0.1",)))
    return root / "fed"


def site(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "site_agent", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def csr_of(tmp: Path, name: str) -> Path:
    """A site's own kit and CSR, made in-process (the CLI is covered by test_site_init_enrol_install_by_cli)."""
    from site_agent.enrol import init_site

    return init_site(tmp / "site-kits" / name, name)


def test_init_writes_ca_certificates_manifest_and_a_loadable_config(fed: Path) -> None:
    ca = fed.with_name("fed-ca")
    assert not (fed / "ca.key").exists() and (ca / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (fed / "coordinator" / "server.key").stat().st_mode & 0o777 == 0o600
    assert cert_identity(ca / "admin" / "client.pem").role == "admin"
    assert (ca / "admin" / "client.key").stat().st_mode & 0o777 == 0o600
    server = x509.load_pem_x509_certificate((fed / "coordinator" / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in sans.get_values_for_type(x509.DNSName)
    manifest = json.loads((fed / "manifest.json").read_text())
    assert manifest["coordinator"] == "fl.example.org:7443" and len(manifest["base_model_sha256"]) == 64
    assert manifest["privacy"]["max_update_norm"] == 10.0
    cfg = load_federation_config(fed / "federation.toml")
    assert cfg.crl == fed / "crl.pem" and cfg.enrolment_registry == fed / "enrolment.json"
    assert cfg.tls.ca == fed / "ca.pem" and cfg.max_update_norm == 10.0
    assert json.loads((fed / "enrolment.json").read_text())["admins"]["admin"]["fingerprint"]
    again = admin("init", "--dir", fed, "--federation-id", "x", "--base-model", fed.parent / "base")
    assert again.returncode == 2 and "already holds a federation" in again.stderr
    inside = admin("init", "--dir", fed.parent / "f2", "--federation-id", "x", "--base-model", fed.parent / "base",
                   "--ca-dir", fed.parent / "f2" / "ca")
    assert inside.returncode == 2 and "inside the federation directory" in " ".join(inside.stderr.split())


def test_site_init_enrol_install_by_cli_keeps_every_site_key_on_the_site(fed: Path, tmp_path: Path) -> None:
    # Execute: the whole operator sequence, as the real CLIs
    kit = tmp_path / "hospital-a-kit"
    r = site("init", "--dir", kit, "--name", "hospital-a")
    assert r.returncode == 0, r.stderr
    assert (kit / "client.key").stat().st_mode & 0o777 == 0o600 and (kit / "signing.key").stat().st_mode & 0o777 == 0o600
    r = admin("enroll-site", "--csr", kit / "client.csr", "--region", "EU-DE", "--fed-dir", fed, "--out",
              tmp_path / "a.bundle.json")
    assert r.returncode == 0, r.stderr
    r = site("install-bundle", "--dir", kit, "--bundle", tmp_path / "a.bundle.json")
    assert r.returncode == 0, r.stderr
    # Assert: a working kit, and no private key of the site anywhere but its own folder
    ident = cert_identity(kit / "client.pem")
    assert (ident.name, ident.role, ident.region) == ("hospital-a", "site", "EU-DE") and ident.signing_key
    site_cfg = load_site_config(kit / "site.toml")
    assert site_cfg.coordinator == "fl.example.org:7443" and site_cfg.tls.signing_key == kit / "signing.key"
    policy = load_policy(kit / "policy.toml")
    manifest = json.loads((fed / "manifest.json").read_text())
    assert policy.allowed_base_models == (manifest["base_model_sha256"],)
    assert policy.trusted_ca_sha256 == (ca_sha256((fed / "ca.pem").read_bytes()),)
    registry = json.loads((fed / "enrolment.json").read_text())["sites"]
    assert registry["hospital-a"]["region"] == "EU-DE" and registry["hospital-a"]["serial"] == ident.serial
    site_keys = {(kit / "client.key").read_bytes().strip(), (kit / "signing.key").read_bytes().strip()}
    for folder in (fed, fed.with_name("fed-ca"), tmp_path / "a.bundle.json"):
        for f in ([folder] if folder.is_file() else folder.rglob("*")):
            if f.is_file():
                data = f.read_bytes()
                assert not any(k in data for k in site_keys), f
                if b"PRIVATE KEY" in data:  # the only private keys there: the CA's, the coordinator's, the admin's
                    assert f.name in ("ca.key", "server.key", "client.key") and "sites" not in f.parts, f
    assert b"PRIVATE KEY" not in (tmp_path / "a.bundle.json").read_bytes()


@pytest.mark.parametrize("case,message", [
    ("already", "already enrolled"),
    ("region-lower", "invalid region"),
    ("region-word", "invalid region"),
    ("bad-name", "invalid site name"),
    ("admin-csr", "role 'admin'"),
    ("no-signing-key", "must carry its Ed25519 signing key"),
    ("bad-pop", "proof of possession does not verify"),
    ("garbage", "not a PEM certificate signing request"),
])
def test_enroll_site_refuses_bad_csrs_clearly(fed_inproc: Path, tmp_path: Path, case: str, message: str) -> None:
    # Prepare
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedcommon.certs import SIGNING_POP_OID, build_csr

    region = {"region-lower": "eu-de", "region-word": "Germany"}.get(case, "EU-DE")
    csr = tmp_path / "x.csr"
    tls = ec.generate_private_key(ec.SECP256R1())
    fed = fed_inproc
    if case == "already":
        first = csr_of(tmp_path, "hospital-a")
        enroll_csr(fed, fed.with_name("fed-ca"), first.read_bytes(), region="EU-DE")
        csr = csr_of(tmp_path / "again", "hospital-a")
    elif case == "bad-name":  # a hostile site builds its CSR itself, past the site tool's own name check
        import re

        import fedcommon.certs as certs_mod

        with pytest.MonkeyPatch.context() as m:
            m.setattr(certs_mod, "SITE_NAME", re.compile(r".+"))
            csr.write_bytes(build_csr("bad/name", "site", tls, Ed25519PrivateKey.generate()))
    elif case == "admin-csr":
        csr.write_bytes(build_csr("mallory", "admin", tls))
    elif case == "no-signing-key":
        csr.write_bytes(build_csr("clinic", "site", tls))
    elif case == "bad-pop":  # someone else's signing public key, with a proof made by a different key
        victim, mine = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        from cryptography import x509 as x
        from cryptography.hazmat.primitives import hashes, serialization

        real = x.load_pem_x509_csr(build_csr("clinic", "site", tls, mine))
        blob = real.extensions.get_extension_for_oid(SIGNING_POP_OID).value.value
        raw = victim.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        forged = (x.CertificateSigningRequestBuilder().subject_name(real.subject)
                  .add_extension(x.UnrecognizedExtension(SIGNING_POP_OID, raw + blob[32:]), critical=False)
                  .sign(tls, hashes.SHA256()))
        csr.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    elif case == "garbage":
        csr.write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    else:
        csr = csr_of(tmp_path, "clinic")
    # Execute / Assert: one clear message naming the CSR file; the registry is unchanged
    before = (fed / "enrolment.json").read_bytes()
    with pytest.raises(EnrolmentError) as e:
        enroll_csr(fed, fed.with_name("fed-ca"), csr.read_bytes(), region=region, where=str(csr))
    assert message in str(e.value), e.value
    assert (fed / "enrolment.json").read_bytes() == before


def test_enroll_site_cli_refusal_is_one_line_without_traceback(fed: Path, tmp_path: Path) -> None:
    csr = csr_of(tmp_path, "clinic")
    r = admin("enroll-site", "--csr", csr, "--region", "Germany", "--fed-dir", fed)
    assert r.returncode == 2 and "invalid region" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_revoke_site_signs_a_crl_with_the_serial(fed: Path, tmp_path: Path) -> None:
    r = admin("enroll-site", "--csr", csr_of(tmp_path, "lab-b"), "--region", "EU-FR", "--fed-dir", fed)
    assert r.returncode == 0, r.stderr
    serial = json.loads((fed / "enrolment.json").read_text())["sites"]["lab-b"]["serial"]

    r = admin("revoke-site", "lab-b", "--fed-dir", fed, "--reason", "left the consortium")

    assert r.returncode == 0, r.stderr
    ca = x509.load_pem_x509_certificate((fed / "ca.pem").read_bytes())
    assert serial in load_crl(fed / "crl.pem", ca)
    assert json.loads((fed / "enrolment.json").read_text())["sites"]["lab-b"]["revoke_reason"] == "left the consortium"
    again = admin("revoke-site", "lab-b", "--fed-dir", fed)
    assert again.returncode == 2 and "already revoked" in again.stderr
    unknown = admin("revoke-site", "nobody", "--fed-dir", fed)
    assert unknown.returncode == 2 and "not enrolled" in unknown.stderr
    listed = json.loads(admin("list-certs", "--fed-dir", fed, "--json").stdout)
    assert {(r["role"], r["name"], r["state"]) for r in listed} == {("site", "lab-b", "revoked"),
                                                                    ("admin", "admin", "valid")}


def test_admin_enrolled_by_csr_then_revoked_lands_in_the_crl(fed: Path, tmp_path: Path) -> None:
    kit = tmp_path / "ops-kit"
    assert admin("admin-csr", "--dir", kit, "--name", "ops").returncode == 0
    r = admin("enroll-admin", "--csr", kit / "client.csr", "--fed-dir", fed, "--out", tmp_path / "ops.json")
    assert r.returncode == 0, r.stderr
    assert admin("install-bundle", "--dir", kit, "--bundle", tmp_path / "ops.json").returncode == 0
    assert cert_identity(kit / "client.pem").role == "admin"
    r = admin("revoke-admin", "ops", "--fed-dir", fed, "--reason", "left")
    assert r.returncode == 0, r.stderr
    ca = x509.load_pem_x509_certificate((fed / "ca.pem").read_bytes())
    assert cert_identity(kit / "client.pem").serial in load_crl(fed / "crl.pem", ca)


# -- a real coordinator's audit log and record of processing --------------------------------------------------------
@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> LiveCoordinator:
    """A coordinator that saw joins, an accepted update, a refused one and a revocation, then stopped."""
    live = LiveCoordinator(tmp_path_factory.mktemp("ran"), sites=("site-a", "site-b", "site-c"))
    try:
        for s in ("site-a", "site-b"):
            live.site_stub(s).Join(pb.JoinRequest(agent_version="t"), timeout=10)
        signed, payload = live.update("site-a", delta(0.1, 0.1), epsilon_spent=1.5)
        assert live.site_stub("site-a").UploadUpdate(upload_messages(signed, payload), timeout=10).accepted
        bad = pb.SignedEnvelope(envelope=signed.envelope, signature=bytes(64))
        with pytest.raises(Exception):  # noqa: B017 - the status is asserted in test_ingress_grpc
            live.site_stub("site-b").UploadUpdate(upload_messages(bad, payload), timeout=10)
        live.call(lambda: live.engine.revoke_site("site-c", "never showed up", "admin"))
    finally:
        live.close()
    return live


def _copy_state(live: LiveCoordinator, dst: Path) -> Path:
    shutil.copytree(live.cfg.state_dir, dst)
    return dst


def test_audit_verify_ok_on_an_untouched_log(ran: LiveCoordinator) -> None:
    r = admin("audit", "verify", "--state-dir", ran.cfg.state_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK") and "matches the store" in r.stdout
    events = [rec["event"] for rec in ran.audit_records()]
    for e in ("site_joined", "update_accepted", "update_refused", "site_revoked"):
        assert e in events


def _lines(p: Path) -> list[str]:
    return p.read_text().splitlines(keepends=True)


@pytest.mark.parametrize("tamper,expect", [
    ("edit", "line 3: hash does not match"),
    ("remove", "line 2: seq"),
    ("reorder", "line 2: seq"),
    ("cut_tail_and_head_file", "lines were cut off the end"),
])
def test_audit_verify_locates_tampering(ran: LiveCoordinator, tmp_path: Path, tamper: str, expect: str) -> None:
    # Prepare
    state = _copy_state(ran, tmp_path / "state")
    log = state / "audit.jsonl"
    lines = _lines(log)
    if tamper == "edit":
        rec = json.loads(lines[2])
        rec["fields"]["site"] = "someone-else"
        lines[2] = json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"
    elif tamper == "remove":
        del lines[1]
    elif tamper == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines = lines[:-2]
        (state / "audit.jsonl.head").unlink()  # only the store's copy of the head is left to catch it
    log.write_text("".join(lines))

    # Execute
    r = admin("audit", "verify", "--state-dir", state)

    # Assert
    assert r.returncode == 1, r.stdout
    assert "TAMPERED" in r.stdout and expect in " ".join(r.stdout.split()), r.stdout


def test_export_records_states_parties_regions_transfers_and_unset_fields(ran: LiveCoordinator, tmp_path: Path) -> None:
    # Prepare: a federation.toml for the stopped coordinator, with some [records] set and others not
    from fedcommon.tomlconfig import dumps

    cfg = ran.cfg
    toml = tmp_path / "federation.toml"
    toml.write_text(dumps({
        "federation_id": cfg.federation_id, "base_model": str(cfg.base_model), "state_dir": str(cfg.state_dir),
        "registry_dir": str(cfg.registry_dir), "enrolment_registry": str(cfg.enrolment_registry),
        "crl": str(cfg.crl), "tls": {"ca": str(cfg.tls.ca), "cert": str(cfg.tls.cert), "key": str(cfg.tls.key)},
        "records": {"controller": "Consortium GmbH, dpo@example.org", "purposes": ["fine-tune a triage assistant"],
                    "coordinator_region": "EU-DE", "retention_days": 365}}))

    # Execute
    js = admin("export-records", "--config", toml, "--json")
    md = admin("export-records", "--config", toml)

    # Assert
    assert js.returncode == 0 and md.returncode == 0, js.stderr + md.stderr
    rec = json.loads(js.stdout)
    sites = {p["name"]: p for p in rec["parties"] if p["role"].startswith("site")}
    assert {n: p["region"] for n, p in sites.items()} == {"site-a": "EU-DE", "site-b": "EU-FR", "site-c": "EU-NL"}
    transfers = {t["from_site"]: t for t in rec["transfers"]}
    assert transfers["site-a"]["updates"] == 1 and transfers["site-a"]["to_region"] == "EU-DE"
    assert transfers["site-b"]["updates"] == 0 and "adapter deltas only" in transfers["site-a"]["data"]
    assert rec["safeguards"]["differential_privacy"] == {"site-a": 1.5, "site-b": 0.0, "site-c": 0.0}
    assert rec["purposes"] == ["fine-tune a triage assistant"] and rec["retention"]["updates_and_audit_logs_days"] == 365
    assert rec["data_categories"][0].startswith("NOT SET (set [records].data_categories")
    assert "| site-b | EU-FR |" in md.stdout and "## Transfers" in md.stdout and "site-a: ε=1.5" in md.stdout
