"""The federation directory and the CA folder: who is enrolled, the CRL, and the signing of CSRs.

``fedbridge-admin init`` lays out two folders. The *CA folder* (``--ca-dir``, default ``FED-ca`` beside ``FED``)
holds the CA key and the first administrator's kit; keep it on the CA holder's machine or offline. The *federation
directory* ``FED`` is what the coordinator runs from: the CA certificate, the CRL, the enrolment registry, the
manifest, ``federation.toml`` and the coordinator's own key -- never the CA key (the coordinator refuses to start
next to one). Sites and admins make their own keys and send a CSR (:mod:`fedcommon.csr`); ``enroll-site --csr``,
``enroll-admin --csr`` and ``renew-site --csr`` check it, sign it with the CA key and write a bundle with no private key
in it; ``revoke-site`` / ``revoke-admin`` mark the registry and re-sign the CRL. The coordinator reads the registry and
the CRL through :class:`AccessList` and reloads them when either file changes on disk, so an enrolment, a renewal or a
revocation takes effect without a restart. With the CA offline, copy ``enrolment.json`` and ``crl.pem`` to the
coordinator after each change.

Layout::

    CA/ca.key (0600)  ca.pem           CA/admin/client.key (0600)  client.pem  ca.pem  (the first admin)
    FED/ca.pem  crl.pem  enrolment.json  manifest.json  federation.toml  coordinator/server.pem  server.key (0600)
    FED/bundles/<name>.bundle.json (what enroll-site --csr writes by default: certificates only)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from coordinator.errors import NotEnrolled, Revoked
from coordinator.trust.pki import (
    LEAF_DAYS,
    REGION_PATTERN,
    CertificateAuthority,
    PeerIdentity,
    PKIError,
    _write,
    load_crl,
    peer_identity,
    write_crl,
)
from fedcommon import certs
from fedcommon.certs import SITE_NAME, ca_sha256
from fedcommon.csr import BUNDLE_FORMAT
from fedcommon.durable import write_durable
from fedcommon.manifest import Manifest

REGISTRY = "enrolment.json"
CRL = "crl.pem"
MANIFEST = "manifest.json"
TEMPLATE = "chat_template.jinja"  # the federation-supplied chat template, if any ([model] chat_template)
CA_KEY = "ca.key"


class EnrolmentError(ValueError):
    """A federation-directory operation cannot be done (the message says what and where)."""


@dataclass(frozen=True)
class Enrolment:
    """One site (or admin) of the registry.

    ``serial``/``fingerprint`` name the current certificate; ``previous_*`` the one it renewed, which stays accepted
    until it expires (TLS refuses it then) so that a site still connected with it is not cut off by its renewal.
    ``tls_key_sha256``/``signing_key`` are the enrolled keys, which a renewal must present again.
    """

    name: str
    region: str
    serial: int
    fingerprint: str
    enrolled_ms: int
    revoked_ms: int = 0
    revoke_reason: str = ""
    revoked_by: str = ""
    not_after_ms: int = 0
    tls_key_sha256: str = ""
    signing_key: str = ""
    previous_serial: int = 0
    previous_fingerprint: str = ""
    renewed_ms: int = 0


@dataclass(frozen=True)
class Registry:
    """``enrolment.json``: the enrolled sites and admins (``admins`` None: a registry from before admin enrolment,
    which leaves admin certificates to the CRL alone)."""

    sites: dict[str, Enrolment]
    admins: dict[str, Enrolment] | None = None


def _now_ms() -> int:
    return int(time.time() * 1000)


def load_full_registry(path: Path) -> Registry:
    """Read ``enrolment.json``; raises :class:`EnrolmentError` naming the file on anything malformed."""
    try:
        data = json.loads(Path(path).read_text())
        sites = {name: Enrolment(**row) for name, row in data["sites"].items()}
        admins = {name: Enrolment(**row) for name, row in data["admins"].items()} if "admins" in data else None
        return Registry(sites, admins)
    except FileNotFoundError:
        raise EnrolmentError(f"{path}: enrolment registry not found") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EnrolmentError(f"{path}: malformed enrolment registry ({e})") from None


def load_registry(path: Path) -> dict[str, Enrolment]:
    """The sites of ``enrolment.json`` (:func:`load_full_registry`)."""
    return load_full_registry(path).sites


def save_registry(path: Path, sites: dict[str, Enrolment], admins: dict[str, Enrolment] | None = None) -> None:
    if admins is None and Path(path).exists():  # a sites-only save keeps the admins
        admins = load_full_registry(path).admins
    body: dict[str, Any] = {"sites": {n: asdict(e) for n, e in sorted(sites.items())}}
    if admins is not None:
        body["admins"] = {n: asdict(e) for n, e in sorted(admins.items())}
    write_durable(Path(path), (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


def default_ca_dir(fed: Path) -> Path:
    """Where ``init`` puts the CA when no ``--ca-dir`` is given: ``FED-ca`` beside ``FED`` (never inside it)."""
    fed = Path(fed).resolve()
    return fed.with_name(fed.name + "-ca")


def _ca(ca_dir: Path) -> CertificateAuthority:
    ca_dir = Path(ca_dir)
    if not (ca_dir / CA_KEY).exists():
        raise EnrolmentError(f"{ca_dir}: no {CA_KEY} here; give the CA folder `fedbridge-admin init` made (--ca-dir)")
    return CertificateAuthority.load(ca_dir / "ca.pem", ca_dir / CA_KEY)


@contextlib.contextmanager
def _locked(fed: Path) -> Iterator[None]:
    """Serialise registry read-modify-writes: two enrolments at once must not lose one another's entry."""
    fd = os.open(Path(fed) / ".enrolment.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
    ca_dir: Path | None = None
    admin_name: str = "admin"
    days: int = LEAF_DAYS


STARTER_HEADER = """\
fedbridge federation config, written by `fedbridge-admin init`: every setting, each with what it means; the
values not chosen at init are the defaults. docs/reference/federation-toml.md has the full reference, and
`fedbridge-admin config check federation.toml` shows what a file resolves to. Fill in [records] (GDPR Art. 30)
before `fedbridge-admin export-records`, and check `listen` below."""


def init_federation(fed: Path, opt: InitOptions) -> dict[str, Any]:
    """Create the federation directory ``fed``; returns the federation manifest."""
    fed = Path(fed)
    ca_dir = Path(opt.ca_dir) if opt.ca_dir else default_ca_dir(fed)
    if (fed / "ca.key").exists() or (fed / MANIFEST).exists() or (ca_dir / CA_KEY).exists():
        raise EnrolmentError(f"{fed}: already holds a federation (or {ca_dir} a CA); refusing to overwrite it")
    if ca_dir.resolve() == fed.resolve() or fed.resolve() in ca_dir.resolve().parents:
        raise EnrolmentError(f"--ca-dir {ca_dir} is inside the federation directory {fed}: the coordinator runs from "
                             "there and must never be able to read the CA key; give a folder outside it")
    if not SITE_NAME.fullmatch(opt.admin_name):
        raise EnrolmentError(f"invalid admin name {opt.admin_name!r}: use 1-64 letters, digits, '.', '_' or '-'")
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
    ca_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ca_dir, 0o700)
    ca = CertificateAuthority.create(f"{opt.federation_id} federation CA")
    ca.save(ca_dir / "ca.pem", ca_dir / CA_KEY)
    _write(fed / "ca.pem", ca.cert_pem)
    # The coordinator's own key is made here (init runs where the coordinator will) and lives beside it.
    server_pem, server_key = ca.issue(opt.hosts[0], "coordinator", hosts=opt.hosts, days=opt.days)
    _write(fed / "coordinator" / "server.pem", server_pem)
    _write(fed / "coordinator" / "server.key", server_key, private=True)
    write_crl(ca, {}, fed / CRL)
    save_registry(fed / REGISTRY, {}, {})
    # The first administrator is the CA holder: their kit goes to the CA folder, never to the coordinator's.
    from fedcommon.csr import install_certificate, make_request

    admin_kit = ca_dir / "admin"
    csr = make_request(admin_kit, opt.admin_name, "admin", signing=False).read_bytes()
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
    from coordinator.configdoc import starter

    write_durable(fed / "federation.toml", starter(toml, STARTER_HEADER).encode())
    _, bundle = enroll_csr(fed, ca_dir, csr, role="admin", days=opt.days, where=str(admin_kit / "client.csr"))
    write_durable(admin_kit / f"{opt.admin_name}.bundle.json", bundle)
    install_certificate(admin_kit, admin_kit / f"{opt.admin_name}.bundle.json")
    return manifest


def _section(reg: Registry, role: str) -> dict[str, Enrolment]:
    if role == "site":
        return reg.sites
    return reg.admins if reg.admins is not None else {}


def _checked_csr(csr_pem: bytes, role: str, where: str) -> certs.CsrRequest:
    try:
        req = certs.read_csr(csr_pem, where)
    except certs.CertificateError as e:
        raise EnrolmentError(str(e)) from None
    if req.role != role:
        raise EnrolmentError(f"{where}: the CSR asks for role {req.role!r} (OU), this command signs {role!r} CSRs")
    if not SITE_NAME.fullmatch(req.name):
        raise EnrolmentError(f"{where}: invalid {role} name {req.name!r} (CN): use 1-64 letters, digits, '.', '_' "
                             "or '-', starting with a letter or digit")
    if role == "site" and req.signing_key is None:
        raise EnrolmentError(f"{where}: a site CSR must carry its Ed25519 signing key with proof of possession "
                             "(make it with `fedbridge-site init`)")
    return req


def _bundle(fed: Path, ca: CertificateAuthority, cert_pem: bytes, entry: Enrolment, role: str, coordinator: str) -> bytes:
    manifest = json.loads((fed / MANIFEST).read_text())
    server = x509.load_pem_x509_certificate((fed / "coordinator" / "server.pem").read_bytes())
    doc: dict[str, Any] = {
        "format": BUNDLE_FORMAT, "name": entry.name, "role": role, "region": entry.region,
        "cert": cert_pem.decode(), "ca": ca.cert_pem.decode(), "ca_sha256": ca_sha256(ca.cert),
        "coordinator": coordinator or manifest["coordinator"], "coordinator_cert_sha256": ca_sha256(server),
        "not_after_ms": entry.not_after_ms,
    }
    if role == "site":
        doc["manifest"] = manifest
        if (fed / TEMPLATE).is_file():  # the task carries it too; the kit's copy lets preflight train with it first
            doc["chat_template"] = (fed / TEMPLATE).read_text(encoding="utf-8")
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _entry(name: str, region: str, cert_pem: bytes, req: certs.CsrRequest, **more: Any) -> Enrolment:
    ident = peer_identity(cert_pem)
    cert = x509.load_pem_x509_certificate(cert_pem)
    return Enrolment(name=name, region=region, serial=ident.serial, fingerprint=ident.fingerprint,
                     enrolled_ms=more.pop("enrolled_ms", _now_ms()),
                     not_after_ms=int(cert.not_valid_after_utc.timestamp() * 1000),
                     tls_key_sha256=certs.tls_key_sha256(req.tls_public_key),
                     signing_key=certs.signing_key_hex(req.signing_key), **more)


def enroll_csr(fed: Path, ca_dir: Path, csr_pem: bytes, *, region: str = "", role: str = "site",
               re_enroll: bool = False, days: int = LEAF_DAYS, coordinator: str = "",
               where: str = "CSR") -> tuple[Enrolment, bytes]:
    """Check a site's (or admin's) CSR, sign it, record it in the registry; returns the entry and the bundle bytes.

    Args:
        fed: The federation directory (registry, manifest, CRL).
        ca_dir: The CA folder (``ca.key``).
        csr_pem: The CSR the site made (``fedbridge-site init``) or the admin made (``fedbridge-admin admin-csr``).
        region: The site's data region (sites only; embedded in the certificate).
        role: ``site`` or ``admin``.
        re_enroll: Replace an enrolled (or revoked) name's entry: new keys; the old certificates are revoked.
        days: Certificate validity.
        coordinator: ``host:port`` the bundle tells the site to dial (default: the manifest's).
        where: How messages name the CSR (its file).

    Raises:
        EnrolmentError: Bad CSR, name, region or role, or the name is taken (and not ``re_enroll``).
    """
    fed = Path(fed)
    req = _checked_csr(csr_pem, role, where)
    if role == "site" and not REGION_PATTERN.match(region):
        raise EnrolmentError(f"invalid region {region!r}: use upper-case codes like EU-DE, EU-FR or US-CA")
    ca = _ca(ca_dir)
    with _locked(fed):
        reg = load_full_registry(fed / REGISTRY)
        section = _section(reg, role)
        old = section.get(req.name)
        if old is not None and not re_enroll:
            state = "revoked" if old.revoked_ms else "enrolled"
            raise EnrolmentError(f"{role} {req.name!r} is already {state} in {fed / REGISTRY}; pick another name, "
                                 f"renew with `renew-{role} --csr`, or replace its keys with --re-enroll")
        try:
            cert_pem = ca.sign_csr(req, region=region if role == "site" else "", days=days)
        except PKIError as e:
            raise EnrolmentError(f"{where}: {e}") from None
        entry = _entry(req.name, region if role == "site" else "", cert_pem, req)
        section[req.name] = entry
        if old is not None:  # the replaced certificates must stop working now, not when they expire
            _write_crl_for(ca, fed, reg, extra={old.serial: _now_ms(), **({old.previous_serial: _now_ms()}
                                                                           if old.previous_serial else {})})
        save_registry(fed / REGISTRY, reg.sites, reg.admins if role == "site" else section)
    return entry, _bundle(fed, ca, cert_pem, entry, role, coordinator)


def renew_csr(fed: Path, ca_dir: Path, csr_pem: bytes, *, role: str = "site", days: int = LEAF_DAYS,
              coordinator: str = "", where: str = "CSR") -> tuple[Enrolment, bytes]:
    """Sign a renewal CSR made with the enrolled keys; returns the updated entry and the bundle bytes.

    The previous certificate stays accepted until it expires, so a site still connected with it keeps working while it
    installs the new one; the coordinator picks up the registry change without a restart.

    Raises:
        EnrolmentError: Not enrolled, revoked, expired, or the CSR's keys are not the enrolled ones.
    """
    fed = Path(fed)
    req = _checked_csr(csr_pem, role, where)
    ca = _ca(ca_dir)
    with _locked(fed):
        reg = load_full_registry(fed / REGISTRY)
        section = _section(reg, role)
        old = section.get(req.name)
        if old is None:
            raise EnrolmentError(f"{where}: {role} {req.name!r} is not enrolled in {fed / REGISTRY}; enrol it first")
        if old.revoked_ms:
            raise EnrolmentError(f"{where}: {role} {req.name!r} was revoked ({old.revoke_reason or 'no reason'}); "
                                 "a revoked certificate is not renewed")
        if old.not_after_ms and old.not_after_ms <= _now_ms():
            raise EnrolmentError(f"{where}: the certificate of {role} {req.name!r} has expired; renew before expiry, "
                                 "or enrol again with --re-enroll")
        if (old.tls_key_sha256 and old.tls_key_sha256 != certs.tls_key_sha256(req.tls_public_key)) or \
                old.signing_key != certs.signing_key_hex(req.signing_key):
            raise EnrolmentError(f"{where}: the CSR's keys are not the ones enrolled for {role} {req.name!r}; a "
                                 "renewal keeps the keys (new keys: enroll with --re-enroll)")
        try:
            cert_pem = ca.sign_csr(req, region=old.region, days=days)
        except PKIError as e:
            raise EnrolmentError(f"{where}: {e}") from None
        entry = _entry(req.name, old.region, cert_pem, req, enrolled_ms=old.enrolled_ms, previous_serial=old.serial,
                       previous_fingerprint=old.fingerprint, renewed_ms=_now_ms())
        section[req.name] = entry
        save_registry(fed / REGISTRY, reg.sites, reg.admins if role == "site" else section)
    return entry, _bundle(fed, ca, cert_pem, entry, role, coordinator)


def _write_crl_for(ca: CertificateAuthority, fed: Path, reg: Registry, extra: dict[int, int] | None = None) -> None:
    """Re-sign the CRL: every revoked entry's current and previous serials, the existing CRL's, and ``extra``."""
    when: dict[int, int] = {}
    if (fed / CRL).exists():
        crl = x509.load_pem_x509_crl((fed / CRL).read_bytes())
        when.update({r.serial_number: int(r.revocation_date_utc.timestamp() * 1000) for r in crl})
    for e in [*reg.sites.values(), *(reg.admins or {}).values()]:
        if e.revoked_ms:
            when.setdefault(e.serial, e.revoked_ms)
            if e.previous_serial:
                when.setdefault(e.previous_serial, e.revoked_ms)
    for serial, ms in (extra or {}).items():
        when.setdefault(serial, ms)
    write_crl(ca, {s: dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc) for s, ms in when.items()}, fed / CRL)


def revoke(fed: Path, ca_dir: Path, name: str, reason: str, actor: str = "fedbridge-admin",
           role: str = "site") -> Enrolment:
    """Mark ``name`` revoked in the registry and add its certificates' serials to the signed CRL."""
    fed = Path(fed)
    ca = _ca(ca_dir)
    with _locked(fed):
        reg = load_full_registry(fed / REGISTRY)
        section = _section(reg, role)
        if name not in section:
            raise EnrolmentError(f"{role} {name!r} is not enrolled in {fed / REGISTRY}")
        entry = section[name]
        if entry.revoked_ms:
            raise EnrolmentError(f"{role} {name!r} was already revoked ({entry.revoke_reason or 'no reason given'})")
        entry = Enrolment(**{**asdict(entry), "revoked_ms": _now_ms(), "revoke_reason": reason[:500],
                             "revoked_by": actor})
        section[name] = entry
        _write_crl_for(ca, fed, reg)  # the CRL first: it is what the coordinator enforces
        save_registry(fed / REGISTRY, reg.sites, reg.admins if role == "site" else section)
    return entry


def revoke_site(fed: Path, name: str, reason: str, actor: str = "fedbridge-admin", ca_dir: Path | None = None
                ) -> Enrolment:
    """:func:`revoke` a site (CA folder default: :func:`default_ca_dir`)."""
    return revoke(fed, ca_dir or default_ca_dir(fed), name, reason, actor, "site")


def list_certificates(fed: Path) -> list[dict[str, Any]]:
    """Every enrolled site and admin with its state and expiry (for ``fedbridge-admin list-certs``)."""
    reg = load_full_registry(Path(fed) / REGISTRY)
    now = _now_ms()
    rows = []
    for role, section in (("site", reg.sites), ("admin", reg.admins or {})):
        for e in section.values():
            state = "revoked" if e.revoked_ms else ("expired" if e.not_after_ms and e.not_after_ms <= now else "valid")
            rows.append({"role": role, "name": e.name, "region": e.region, "state": state, "serial": f"{e.serial:x}",
                         "not_after_ms": e.not_after_ms, "renewed_ms": e.renewed_ms,
                         "revoke_reason": e.revoke_reason})
    return rows


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
        self.admins: dict[str, Enrolment] | None = None
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
            reg = load_full_registry(self.registry_path)
            self.sites, self.admins = reg.sites, reg.admins
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
        if peer.fingerprint not in (entry.fingerprint, entry.previous_fingerprint):  # previous: until it expires
            raise NotEnrolled(f"the certificate presented for site {peer.name!r} is not the one enrolled")

    def check_admin(self, peer: PeerIdentity) -> None:
        """Raise :class:`Revoked` or :class:`NotEnrolled` unless ``peer``'s admin certificate may administer.

        A registry written before admin enrolment has no ``admins`` section; then only the CRL applies.
        """
        if peer.serial in self.revoked_serials:
            raise Revoked(f"the admin certificate of {peer.name!r} is revoked (CRL)")
        if self.registry_path is None or self.admins is None:
            return
        entry = self.admins.get(peer.name)
        if entry is None:
            raise NotEnrolled(f"admin {peer.name!r} is not in the federation's enrolment registry")
        if entry.revoked_ms:
            raise Revoked(f"admin {peer.name!r} was revoked: {entry.revoke_reason or 'no reason given'}")
        if peer.fingerprint not in (entry.fingerprint, entry.previous_fingerprint):
            raise NotEnrolled(f"the certificate presented for admin {peer.name!r} is not the one enrolled")

    def region(self, name: str) -> str:
        entry = self.sites.get(name)
        return entry.region if entry else ""
