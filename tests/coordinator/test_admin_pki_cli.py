"""``fedbridge-admin`` init / enroll-site / revoke-site / export-records / audit verify, run as the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography import x509
from live_coordinator import LiveCoordinator, delta, upload_messages

from coordinator.config import load_federation_config
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


def test_init_writes_ca_certificates_manifest_and_a_loadable_config(fed: Path) -> None:
    assert (fed / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (fed / "coordinator" / "server.key").stat().st_mode & 0o777 == 0o600
    assert cert_identity(fed / "admin" / "admin.pem").role == "admin"
    server = x509.load_pem_x509_certificate((fed / "coordinator" / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in sans.get_values_for_type(x509.DNSName)
    manifest = json.loads((fed / "manifest.json").read_text())
    assert manifest["coordinator"] == "fl.example.org:7443" and len(manifest["base_model_sha256"]) == 64
    assert manifest["privacy"]["max_update_norm"] == 10.0
    cfg = load_federation_config(fed / "federation.toml")
    assert cfg.crl == fed / "crl.pem" and cfg.enrolment_registry == fed / "enrolment.json"
    assert cfg.tls.ca == fed / "ca.pem" and cfg.max_update_norm == 10.0
    again = admin("init", "--dir", fed, "--federation-id", "x", "--base-model", fed.parent / "base")
    assert again.returncode == 2 and "already holds a federation" in again.stderr


def test_enroll_site_writes_a_kit_with_region_pinned_policy_and_archive(fed: Path) -> None:
    r = admin("enroll-site", "hospital-a", "--region", "EU-DE", "--fed-dir", fed, "--archive")
    assert r.returncode == 0, r.stderr
    kit = fed / "sites" / "hospital-a"
    ident = cert_identity(kit / "client.pem")
    assert (ident.name, ident.role, ident.region) == ("hospital-a", "site", "EU-DE") and ident.signing_key
    assert (kit / "client.key").stat().st_mode & 0o777 == 0o600
    site = load_site_config(kit / "site.toml")
    assert site.coordinator == "fl.example.org:7443" and site.tls.signing_key == kit / "signing.key"
    policy = load_policy(kit / "policy.toml")
    manifest = json.loads((fed / "manifest.json").read_text())
    assert policy.allowed_base_models == (manifest["base_model_sha256"],)
    assert policy.trusted_ca_sha256 == (ca_sha256((fed / "ca.pem").read_bytes()),)
    registry = json.loads((fed / "enrolment.json").read_text())["sites"]
    assert registry["hospital-a"]["region"] == "EU-DE" and registry["hospital-a"]["serial"] == ident.serial
    with tarfile.open(fed / "sites" / "hospital-a.tar.gz") as tar:
        names = tar.getnames()
    assert "hospital-a/signing.key" in names and "hospital-a/policy.toml" in names


@pytest.mark.parametrize("args,message", [
    (("hospital-a", "--region", "EU-DE"), "already enrolled"),
    (("clinic", "--region", "eu-de"), "invalid region"),
    (("clinic", "--region", "Germany"), "invalid region"),
    (("bad/name", "--region", "EU-DE"), "invalid site name"),
])
def test_enroll_site_refuses_bad_input_clearly(fed: Path, args: tuple[str, ...], message: str) -> None:
    # Prepare
    if "already" in message:
        assert admin("enroll-site", "hospital-a", "--region", "EU-DE", "--fed-dir", fed).returncode == 0
    # Execute
    r = admin("enroll-site", *args, "--fed-dir", fed)
    # Assert
    assert r.returncode == 2 and message in " ".join(r.stderr.split()), r.stderr


def test_revoke_site_signs_a_crl_with_the_serial(fed: Path) -> None:
    admin("enroll-site", "lab-b", "--region", "EU-FR", "--fed-dir", fed)
    serial = cert_identity(fed / "sites" / "lab-b" / "client.pem").serial

    r = admin("revoke-site", "lab-b", "--fed-dir", fed, "--reason", "left the consortium")

    assert r.returncode == 0, r.stderr
    ca = x509.load_pem_x509_certificate((fed / "ca.pem").read_bytes())
    assert serial in load_crl(fed / "crl.pem", ca)
    assert json.loads((fed / "enrolment.json").read_text())["sites"]["lab-b"]["revoke_reason"] == "left the consortium"
    again = admin("revoke-site", "lab-b", "--fed-dir", fed)
    assert again.returncode == 2 and "already revoked" in again.stderr
    unknown = admin("revoke-site", "nobody", "--fed-dir", fed)
    assert unknown.returncode == 2 and "not enrolled" in unknown.stderr


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
