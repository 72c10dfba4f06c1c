"""The acceptance sequence with real processes: init -> site init (keys + CSR on the site) -> enroll-site --csr ->
install-bundle -> serve with the CA folder gone (offline) -> join -> revoke-site -> refused, then audit verify OK ->
tamper -> audit verify fails, and the record of processing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from protos.fedbridge.v1 import federation_service_pb2 as pb
from protos.fedbridge.v1 import federation_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def admin(*args: str | Path) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "coordinator", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    return r


def site_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "site_agent", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


def _join(fed: Path, port: int, site: str) -> pb.JoinResponse:
    kit = fed.parent / "site-kits" / site
    creds = grpc.ssl_channel_credentials((kit / "ca.pem").read_bytes(), (kit / "client.key").read_bytes(),
                                         (kit / "client.pem").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        return pb_grpc.FederationServiceStub(ch).Join(pb.JoinRequest(agent_version="test"), timeout=10)


def test_enrol_join_revoke_refused_then_tamper_verify_fails(tiny_model_dir: Path, tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    assert admin("init", "--dir", fed, "--federation-id", "acceptance", "--base-model", tiny_model_dir,
                 "--host", "localhost", "--host", "127.0.0.1", "--listen", "127.0.0.1:0").returncode == 0
    for name, region in (("hospital-a", "EU-DE"), ("lab-b", "EU-FR")):
        kit = tmp_path / "site-kits" / name
        assert site_cli("init", "--dir", kit, "--name", name).returncode == 0
        r = admin("enroll-site", "--csr", kit / "client.csr", "--region", region, "--fed-dir", fed, "--out",
                  kit / "bundle.json")
        assert r.returncode == 0, r.stderr
        assert site_cli("install-bundle", "--dir", kit, "--bundle", kit / "bundle.json").returncode == 0
    # The CA goes offline: the coordinator must start and serve with no CA key anywhere on the machine.
    ca_dir = tmp_path / "fed-ca"
    offline = {p.relative_to(ca_dir): p.read_bytes() for p in ca_dir.rglob("*") if p.is_file()}
    shutil.rmtree(ca_dir)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name == "ca.key"]
    log = open(tmp_path / "coordinator.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "coordinator", "serve", "--config", str(fed / "federation.toml")],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    try:
        port_file = fed / "state" / "coordinator.port"
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None, (tmp_path / "coordinator.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        port = int(port_file.read_text())

        # enrol -> join: the coordinator learns identity and region from the certificate
        assert _join(fed, port, "hospital-a").site == "hospital-a"

        # the CA comes back from offline to revoke (CLI: registry + signed CRL) -> the next call is refused
        for rel, data in offline.items():
            (ca_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (ca_dir / rel).write_bytes(data)
        assert admin("revoke-site", "hospital-a", "--fed-dir", fed, "--reason", "key leaked").returncode == 0
        deadline = time.monotonic() + 5
        while True:
            try:
                _join(fed, port, "hospital-a")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in (e.details() or "")
                break
            assert time.monotonic() < deadline, "revocation did not take effect"
            time.sleep(0.2)
        assert _join(fed, port, "lab-b").site == "lab-b"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

    # audit verify: OK, with the whole story in it
    ok = admin("audit", "verify", "--state-dir", fed / "state")
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stdout + ok.stderr
    events = [json.loads(line)["event"] for line in (fed / "state" / "audit.jsonl").read_text().splitlines()]
    for e in ("site_joined", "access_list_reloaded", "site_revoked", "access_refused"):
        assert e in events, events

    # the record of processing knows both sites, their regions, and that hospital-a is revoked
    rec = json.loads(admin("export-records", "--config", fed / "federation.toml", "--json").stdout)
    sites = {p["name"]: (p["region"], p["status"]) for p in rec["parties"] if p["role"].startswith("site")}
    assert sites == {"hospital-a": ("EU-DE", "revoked"), "lab-b": ("EU-FR", "enrolled")}

    # tamper -> verify fails and names the line
    path = fed / "state" / "audit.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[0] = lines[0].replace("hospital-a", "hospital-x")
    path.write_text("".join(lines))
    bad = admin("audit", "verify", "--state-dir", fed / "state")
    assert bad.returncode == 1 and "line 1: hash does not match" in bad.stdout, bad.stdout

