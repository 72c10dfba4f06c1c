"""The federation directory: CA, coordinator and admin certificates, manifest, enrolment registry, CRL, site kits.

``fedbridge-admin init`` lays it out, ``enroll-site`` adds a site (registry entry + kit), ``revoke-site`` marks the
site revoked in the registry and re-signs the CRL. The coordinator reads the registry and the CRL (paths in
``federation.toml``) through :class:`AccessList`, and reloads them when either file changes on disk.

Layout::

    FED/ca.pem  ca.key (0600)  crl.pem  enrolment.json  manifest.json  federation.toml
    FED/coordinator/server.pem  server.key        FED/admin/admin.pem  admin.key
    FED/sites/<name>/ (the site kit)  FED/sites/<name>.tar.gz (with --archive)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.errors import NotEnrolled, Revoked
from coordinator.trust.pki import (
    REGION_PATTERN,
    CertificateAuthority,
    PeerIdentity,
    PKIError,
    _pem_key,
    _write,
    cert_identity,
    load_crl,
    write_crl,
)
from fedcommon.certs import ca_sha256
from fedcommon.durable import write_durable
from fedcommon.manifest import Manifest
from fedcommon.tomlconfig import dumps

REGISTRY = "enrolment.json"
CRL = "crl.pem"
MANIFEST = "manifest.json"
TEMPLATE = "chat_template.jinja"  # the federation-supplied chat template, if any ([model] chat_template)
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class EnrolmentError(ValueError):
    """A federation-directory operation cannot be done (the message says what and where)."""


@dataclass(frozen=True)
class Enrolment:
    """One site of the registry. ``serial``/``fingerprint`` name the certificate issued at enrolment."""

    name: str
    region: str
    serial: int
    fingerprint: str
    enrolled_ms: int
    revoked_ms: int = 0
    revoke_reason: str = ""
    revoked_by: str = ""


def _now_ms() -> int:
    return int(time.time() * 1000)


def load_registry(path: Path) -> dict[str, Enrolment]:
    """Read ``enrolment.json``; raises :class:`EnrolmentError` naming the file on anything malformed."""
    try:
        data = json.loads(Path(path).read_text())
        return {name: Enrolment(**row) for name, row in data["sites"].items()}
    except FileNotFoundError:
        raise EnrolmentError(f"{path}: enrolment registry not found") from None
    except (ValueError, KeyError, TypeError) as e:
        raise EnrolmentError(f"{path}: malformed enrolment registry ({e})") from None


def save_registry(path: Path, sites: dict[str, Enrolment]) -> None:
    body = {"sites": {n: asdict(e) for n, e in sorted(sites.items())}}
    write_durable(Path(path), (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


def _ca(fed: Path) -> CertificateAuthority:
    if not (fed / "ca.key").exists():
        raise EnrolmentError(f"{fed}: not a federation directory (no ca.key); run `fedbridge-admin init` first")
    return CertificateAuthority.load(fed / "ca.pem", fed / "ca.key")


def manifest_sha256(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class InitOptions:
    """What ``fedbridge-admin init`` writes into a new federation directory."""

    federation_id: str
    base_model: Path
    hosts: tuple[str, ...]
    port: int = 50051
    base_model_ref: str = ""
    strategy: str = "fedavg"
    rounds: int = 3
    min_sites: int = 2
    max_update_norm: float = 0.0
    listen: str = ""
    target_modules: tuple[str, ...] = ("all-linear",)
    chat_template: Path | None = None


def init_federation(fed: Path, opt: InitOptions) -> dict[str, Any]:
    """Create the federation directory ``fed``; returns the federation manifest."""
    fed = Path(fed)
    if (fed / "ca.key").exists():
        raise EnrolmentError(f"{fed}: already holds a federation (ca.key exists); refusing to overwrite it")
    if not opt.hosts:
        raise EnrolmentError("give at least one --host for the coordinator's certificate")
    if not 1 <= opt.port <= 65535:
        raise EnrolmentError(f"--port must be in 1..65535, got {opt.port}")
    from coordinator.config import check_strategy

    try:
        check_strategy(opt.strategy, {})
    except ValueError as e:
        raise EnrolmentError(str(e)) from None
    base_sha = Manifest.of_dir(opt.base_model).sha256
    from coordinator.basemodel import BaseModelError, check_target_and_template

    try:  # the adapter's module names and the chat template must fit the base before anything is written
        pin = check_target_and_template(opt.base_model, opt.target_modules, opt.chat_template)
    except BaseModelError as e:
        raise EnrolmentError(str(e)) from None
    fed.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority.create(f"{opt.federation_id} federation CA")
    ca.save(fed / "ca.pem", fed / "ca.key")
    server_pem, server_key = ca.issue(opt.hosts[0], "coordinator", hosts=opt.hosts)
    _write(fed / "coordinator" / "server.pem", server_pem)
    _write(fed / "coordinator" / "server.key", server_key, private=True)
    admin_pem, admin_key = ca.issue("admin", "admin")
    _write(fed / "admin" / "admin.pem", admin_pem)
    _write(fed / "admin" / "admin.key", admin_key, private=True)
    write_crl(ca, {}, fed / CRL)
    save_registry(fed / REGISTRY, {})
    manifest = {
        "federation_id": opt.federation_id, "base_model_sha256": base_sha, "base_model_ref": opt.base_model_ref,
        "chat_template_sha256": pin.sha256, "strategy": opt.strategy, "rounds": opt.rounds, "min_sites": opt.min_sites,
        "coordinator": f"{opt.hosts[0]}:{opt.port}", "ca_sha256": ca_sha256(ca.cert),
        "privacy": {"max_update_norm": opt.max_update_norm, "transport": "mTLS (TLS 1.2+, client certificates)",
                    "update_signatures": "Ed25519 over round, site, base-model hash, payload SHA-256, nonce",
                    "payloads": "LoRA adapter deltas only (safetensors)"},
        "created_ms": _now_ms(),
    }
    write_durable(fed / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    if pin.text:  # the federation's copy, which every site kit gets too (preflight trains with it)
        write_durable(fed / TEMPLATE, pin.text.encode("utf-8"))
    toml = {
        "federation_id": opt.federation_id, "base_model": str(Path(opt.base_model).resolve()),
        "base_model_ref": opt.base_model_ref, "rounds": opt.rounds, "min_sites": opt.min_sites,
        "strategy": opt.strategy, "listen": opt.listen or f"0.0.0.0:{opt.port}", "state_dir": "state",
        "registry_dir": "published",
        "enrolment_registry": REGISTRY, "crl": CRL, "max_update_norm": opt.max_update_norm,
        "tls": {"ca": "ca.pem", "cert": "coordinator/server.pem", "key": "coordinator/server.key"},
        "lora": {"target_modules": list(opt.target_modules)},
        # Safe defaults: a dead site is noticed within 5 min and a round closes without it once one fewer site
        # answered; 24 h from the round's opening is the backstop (docs/operate/operate-a-running-federation.md).
        "quorum": {"heartbeat_timeout_s": 300.0, "deadline_s": 86400.0, "min_at_deadline": max(1, opt.min_sites - 1)},
        **({"model": {"chat_template": TEMPLATE}} if pin.text else {}),
        "records": {"controller": "", "purposes": [], "data_categories": [], "data_subjects": [], "recipients": [],
                    "coordinator_region": "", "retention_days": 0},
    }
    (fed / "federation.toml").write_text(
        "# fedbridge federation config, written by `fedbridge-admin init`. Fill in [records] (GDPR Art. 30) before\n"
        "# `fedbridge-admin export-records`; see coordinator/config.py for every field.\n" + dumps(toml))
    return manifest


def enroll_site(fed: Path, name: str, region: str, out: Path | None = None, archive: bool = False,
                coordinator: str = "") -> Path:
    """Issue a site's certificate (region embedded), record it in the registry, and write its kit.

    Returns:
        The kit directory (or the ``.tar.gz`` when ``archive``).
    """
    fed = Path(fed)
    if not SITE_NAME.fullmatch(name):
        raise EnrolmentError(f"invalid site name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting "
                             "with a letter or digit")
    if not REGION_PATTERN.match(region):
        raise EnrolmentError(f"invalid region {region!r}: use upper-case codes like EU-DE, EU-FR or US-CA")
    ca = _ca(fed)
    registry = load_registry(fed / REGISTRY)
    if name in registry:
        state = "revoked" if registry[name].revoked_ms else "enrolled"
        raise EnrolmentError(f"site {name!r} is already {state} in {fed / REGISTRY}; pick another name")
    manifest = json.loads((fed / MANIFEST).read_text())
    kit_dir = Path(out) if out else fed / "sites" / name
    if kit_dir.exists() and any(kit_dir.iterdir()):
        raise EnrolmentError(f"{kit_dir} exists and is not empty; refusing to overwrite a site kit")
    signing = Ed25519PrivateKey.generate()
    cert_pem, key_pem = ca.issue(name, "site", signing_key=signing.public_key(), region=region)
    _write(kit_dir / "ca.pem", ca.cert_pem)
    _write(kit_dir / "client.pem", cert_pem)
    _write(kit_dir / "client.key", key_pem, private=True)
    _write(kit_dir / "signing.key", _pem_key(signing), private=True)
    ident = cert_identity(kit_dir / "client.pem")
    address = coordinator or manifest["coordinator"]
    write_durable(kit_dir / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    if (fed / TEMPLATE).is_file():  # the task carries it too; the kit's copy lets preflight train with it first
        write_durable(kit_dir / TEMPLATE, (fed / TEMPLATE).read_bytes())
    (kit_dir / "site.toml").write_text(
        "# fedbridge site config for this kit. Point base_model at your copy of the base model and data.train at\n"
        "# your private training file (it never leaves the site); see site_agent/config.py.\n" + dumps({
            "name": name, "coordinator": address, "base_model": "base-model", "work_dir": "work",
            "policy": "policy.toml",
            "tls": {"ca": "ca.pem", "cert": "client.pem", "key": "client.key", "signing_key": "signing.key"},
            "data": {"train": "data/train.jsonl"}}))
    (kit_dir / "policy.toml").write_text(
        "# What this site accepts from the coordinator (site_agent/policy.py). Pins the base model and the CA.\n"
        + dumps({"allowed_base_models": [manifest["base_model_sha256"]], "trusted_ca_sha256": [manifest["ca_sha256"]],
                 "trusted_coordinator_hosts": [address.rsplit(":", 1)[0].strip("[]")]}))
    registry[name] = Enrolment(name=name, region=region, serial=ident.serial, fingerprint=ident.fingerprint,
                               enrolled_ms=_now_ms())
    save_registry(fed / REGISTRY, registry)
    if not archive:
        return kit_dir
    tar_path = kit_dir.with_name(kit_dir.name + ".tar.gz")
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(kit_dir, arcname=name)
    tar_path.chmod(0o600)  # it holds the site's private keys
    return tar_path


def revoke_site(fed: Path, name: str, reason: str, actor: str = "fedbridge-admin") -> Enrolment:
    """Mark ``name`` revoked in the registry and add its certificate's serial to the signed CRL."""
    fed = Path(fed)
    ca = _ca(fed)
    registry = load_registry(fed / REGISTRY)
    if name not in registry:
        raise EnrolmentError(f"site {name!r} is not enrolled in {fed / REGISTRY}")
    entry = registry[name]
    if entry.revoked_ms:
        raise EnrolmentError(f"site {name!r} was already revoked ({entry.revoke_reason or 'no reason given'})")
    when = _now_ms()
    entry = Enrolment(**{**asdict(entry), "revoked_ms": when, "revoke_reason": reason[:500], "revoked_by": actor})
    registry[name] = entry
    revoked = {e.serial: dt.datetime.fromtimestamp(e.revoked_ms / 1000, dt.timezone.utc)
               for e in registry.values() if e.revoked_ms}
    write_crl(ca, revoked, fed / CRL)  # the CRL first: it is what the coordinator enforces
    save_registry(fed / REGISTRY, registry)
    return entry


class AccessList:
    """The coordinator's view of the enrolment registry and the CRL, reloaded whenever either file changes.

    Args:
        ca_cert: The federation CA certificate (the CRL must be signed by it).
        registry: ``enrolment.json``; None: every CA-signed site certificate is enrolled.
        crl: The CRL file; None: no CRL.
    """

    def __init__(self, ca_cert: Path, registry: Path | None, crl: Path | None) -> None:
        self.ca_cert_path = Path(ca_cert)
        self.registry_path, self.crl_path = registry, crl
        self._stamps: tuple[tuple[int, int] | None, ...] = ()
        self.sites: dict[str, Enrolment] = {}
        self.revoked_serials: set[int] = set()
        self.refresh()

    @staticmethod
    def _stamp(path: Path | None) -> tuple[int, int] | None:
        if path is None:
            return None
        try:
            st = path.stat()
        except FileNotFoundError:
            return (0, -1)
        return (st.st_mtime_ns, st.st_size)

    def refresh(self) -> bool:
        """Reload what changed on disk; returns True when something did.

        Raises:
            EnrolmentError: A configured file is missing or malformed, or the CRL is not the CA's (the coordinator
                refuses every site call until it is fixed rather than trust a stale list).
        """
        stamps = (self._stamp(self.registry_path), self._stamp(self.crl_path))
        if stamps == self._stamps:
            return False
        if self.registry_path is not None:
            self.sites = load_registry(self.registry_path)
        if self.crl_path is not None:
            if not self.crl_path.exists():
                raise EnrolmentError(f"{self.crl_path}: the configured CRL file is missing")
            ca = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
            try:
                self.revoked_serials = load_crl(self.crl_path, ca)
            except PKIError as e:
                raise EnrolmentError(str(e)) from None
        self._stamps = stamps
        return True

    def check(self, peer: PeerIdentity) -> None:
        """Raise :class:`Revoked` or :class:`NotEnrolled` unless ``peer``'s certificate may act as a site."""
        if peer.serial in self.revoked_serials:
            raise Revoked(f"the certificate of site {peer.name!r} is revoked (CRL)")
        if self.registry_path is None:
            return
        entry = self.sites.get(peer.name)
        if entry is None:
            raise NotEnrolled(f"site {peer.name!r} is not in the federation's enrolment registry")
        if entry.revoked_ms:
            raise Revoked(f"site {peer.name!r} was revoked: {entry.revoke_reason or 'no reason given'}")
        if entry.fingerprint != peer.fingerprint:
            raise NotEnrolled(f"the certificate presented for site {peer.name!r} is not the one enrolled")

    def region(self, name: str) -> str:
        entry = self.sites.get(name)
        return entry.region if entry else ""
