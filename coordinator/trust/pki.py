"""Federation PKI: a CA, the coordinator's server certificate, and site/admin client certificates.

Every certificate is issued by the federation CA (ECDSA P-256, X.509 via ``cryptography``). A site certificate
carries the site's name as CN, its role as OU, and the site's Ed25519 envelope-signing public key in a private
extension, so the CA binds the signing key to the identity: the coordinator never trusts a key a request names.
Issuing is here; the OIDs and the reading of a certificate are in :mod:`fedcommon.certs`, which sites share.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcommon import certs
from fedcommon.certs import REGION_OID, SIGNING_KEY_OID, CertIdentity, CsrRequest
from fedcommon.durable import write_durable, write_private

REGION_PATTERN = re.compile(r"^[A-Z]{2,8}(-[A-Z0-9]{2,8}){0,2}$")
ROLES = ("site", "admin", "coordinator")
LEAF_DAYS = 365  # default validity of site, admin and coordinator certificates (renew with the same keys)


class PKIError(ValueError):
    """A certificate is missing, malformed or not usable for the requested role."""


# Who is on the other end of an mTLS connection, as the CA-signed certificate says (parsed in fedcommon.certs, which
# sites use too); the coordinator's name for it.
PeerIdentity = CertIdentity


# Certificates are valid from a little over an hour before they are issued, so a site whose clock is up to an hour
# behind the CA's accepts a freshly issued certificate (its own, the CA's, the coordinator's) at once instead of
# refusing it as not yet valid; public CAs backdate the same way.
BACKDATE = dt.timedelta(hours=1, minutes=5)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem_key(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write a certificate (durably) or a private key (0600 from creation, never over an existing file)."""
    if private:
        write_private(path, data)
    else:
        write_durable(path, data)


def find_ca_key(dirs: tuple[Path, ...], ca_cert: x509.Certificate) -> Path | None:
    """The first file directly in ``dirs`` that holds the private key of ``ca_cert`` (or is named ``ca.key``).

    The coordinator calls this at start: it must run with the CA certificate, the CRL and its own key only, so that
    whoever runs it cannot issue certificates.
    """
    ca_pub = ca_cert.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    for d in dict.fromkeys(Path(x) for x in dirs):
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.name == "ca.key":
                return f
            if not f.is_file() or f.suffix not in (".key", ".pem") or f.stat().st_size > 64 * 1024:
                continue
            try:
                data = f.read_bytes()
            except OSError:
                continue
            if b"PRIVATE KEY-----" not in data:
                continue
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError):
                continue
            pub = key.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
            if pub == ca_pub:
                return f
    return None


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str = "fedbridge federation CA", days: int = 3650) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "ca")])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(_now() - BACKDATE)
                .not_valid_after(_now() + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"{key_path}: CA key must be an EC private key")
        return cls(cert, key)

    def save(self, cert_path: Path, key_path: Path) -> None:
        _write(cert_path, self.cert_pem)
        _write(key_path, _pem_key(self.key), private=True)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, role: str, *, hosts: tuple[str, ...] = (), signing_key: Ed25519PublicKey | None = None,
              days: int = LEAF_DAYS, region: str = "") -> tuple[bytes, bytes]:
        """Issue a leaf certificate with a fresh key made here; returns ``(cert_pem, key_pem)``.

        Only for the coordinator's own certificate and for ``dev-pki``/demo kits: a site or an admin makes its own
        keys and sends a CSR (:meth:`sign_csr`).

        Args:
            name: CN: the site name, the admin's name, or the coordinator's host name.
            role: One of :data:`ROLES`; stored as OU and checked by the coordinator.
            hosts: DNS names / IP addresses for a server certificate's subjectAltName.
            signing_key: For a site, its Ed25519 envelope-signing public key (embedded in an extension).
            days: Validity.
            region: For a site, its data region (``EU-DE``), embedded in an extension.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.certificate(name, role, key.public_key(), hosts=hosts, signing_key=signing_key, days=days,
                                region=region)
        return cert, _pem_key(key)

    def sign_csr(self, req: CsrRequest, *, region: str = "", days: int = LEAF_DAYS) -> bytes:
        """Issue the certificate a checked CSR (:func:`fedcommon.certs.read_csr`) asks for; returns its PEM."""
        return self.certificate(req.name, req.role, req.tls_public_key, signing_key=req.signing_key, days=days,
                                region=region)

    def certificate(self, name: str, role: str, public_key: ec.EllipticCurvePublicKey, *, hosts: tuple[str, ...] = (),
                    signing_key: Ed25519PublicKey | None = None, days: int = LEAF_DAYS, region: str = "",
                    not_before: dt.datetime | None = None) -> bytes:
        """A CA-signed leaf certificate (PEM) for ``public_key``; the arguments are :meth:`issue`'s."""
        if role not in ROLES:
            raise PKIError(f"unknown certificate role {role!r}; expected one of {ROLES}")
        if not name or any(c in name for c in "/\\\n\r\t,=+<>#;\"") or len(name) > 64:
            raise PKIError(f"invalid certificate name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
        if region and not REGION_PATTERN.match(region):
            raise PKIError(f"invalid region {region!r}: use upper-case codes like EU-DE or US-CA")
        if not 1 <= days <= 3650:
            raise PKIError(f"certificate validity must be 1..3650 days, got {days}")
        start = not_before or (_now() - BACKDATE)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)])
        server = role == "coordinator"
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
             .public_key(public_key).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False))
        if hosts:
            sans: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if signing_key is not None:
            raw = signing_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            b = b.add_extension(x509.UnrecognizedExtension(SIGNING_KEY_OID, raw), critical=False)
        if region:
            b = b.add_extension(x509.UnrecognizedExtension(REGION_OID, region.encode()), critical=False)
        return b.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def peer_identity(cert_pem: bytes) -> PeerIdentity:
    """Read name, role, signing key and region from a peer certificate that the TLS layer already verified.

    Raises:
        PKIError: Not PEM, or the fields are missing or malformed (:func:`fedcommon.certs.identity`).
    """
    try:
        return certs.identity(certs.load_pem(cert_pem))
    except certs.CertificateError as e:
        raise PKIError(f"peer {e}") from None


def cert_identity(path: Path) -> PeerIdentity:
    """:func:`peer_identity` of a certificate file."""
    return peer_identity(Path(path).read_bytes())


# -- revocation: an X.509 CRL signed by the federation CA ------------------------------------------------------------
def write_crl(ca: CertificateAuthority, revoked: dict[int, dt.datetime], path: Path, days: int = 3650) -> None:
    """Sign a CRL listing ``revoked`` (serial -> revocation time) and write it atomically and durably (PEM)."""
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject).last_update(_now())
         .next_update(_now() + dt.timedelta(days=days)))
    for serial, when in sorted(revoked.items()):
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(when).build())
    crl = b.sign(ca.key, hashes.SHA256())
    write_durable(Path(path), crl.public_bytes(serialization.Encoding.PEM))  # a power cut leaves the old or the new


def load_crl(path: Path, ca_cert: x509.Certificate) -> set[int]:
    """Serials a CRL file revokes, after checking the federation CA signed it.

    Raises:
        PKIError: The file is not a CRL, or not signed by ``ca_cert``.
    """
    try:
        crl = x509.load_pem_x509_crl(Path(path).read_bytes())
    except ValueError as e:
        raise PKIError(f"{path}: not a PEM CRL ({e})") from None
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise PKIError(f"{path}: the CRL is not signed by the federation CA")
    return {r.serial_number for r in crl}


@dataclass(frozen=True)
class SiteKitPaths:
    """Files a site needs to talk to the coordinator."""

    dir: Path
    ca: Path
    cert: Path
    key: Path
    signing_key: Path


def write_site_kit(ca: CertificateAuthority, name: str, out_dir: Path) -> SiteKitPaths:
    """Create a site's TLS key/cert and Ed25519 signing key under ``out_dir``."""
    signing = Ed25519PrivateKey.generate()
    cert_pem, key_pem = ca.issue(name, "site", signing_key=signing.public_key())
    kit = SiteKitPaths(out_dir, out_dir / "ca.pem", out_dir / "client.pem", out_dir / "client.key",
                       out_dir / "signing.key")
    _write(kit.ca, ca.cert_pem)
    _write(kit.cert, cert_pem)
    _write(kit.key, key_pem, private=True)
    _write(kit.signing_key, _pem_key(signing), private=True)
    return kit


@dataclass(frozen=True)
class DevPKI:
    """A development federation PKI on disk: CA, coordinator server cert, and one kit per site."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    sites: dict[str, SiteKitPaths]
    admin_cert: Path
    admin_key: Path


DEV_PKI_WARNING = ("DEVELOPMENT PKI: this folder holds the private keys of the CA, the coordinator, the admin and "
                   "EVERY site. Whoever can read it can act as any of them. Use it for local tests and demos only; "
                   "a real federation enrols sites by CSR (fedbridge-site init, fedbridge-admin enroll-site --csr).")


def create_dev_pki(out_dir: Path, sites: list[str], hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> DevPKI:
    """Generate a fresh CA, a coordinator certificate for ``hosts``, an admin certificate, and site kits.

    Every private key is made here, in one folder (:data:`DEV_PKI_WARNING`, also written as ``README.txt``). The CA key
    goes to ``out_dir/ca/`` so that the coordinator, which refuses to start next to a CA key, can use ``ca.pem``.
    """
    out_dir = Path(out_dir)
    ca = CertificateAuthority.create()
    ca.save(out_dir / "ca.pem", out_dir / "ca" / "ca.key")
    _write(out_dir / "README.txt", (DEV_PKI_WARNING + "\n").encode())
    server_pem, server_key = ca.issue(hosts[0], "coordinator", hosts=hosts)
    _write(out_dir / "coordinator" / "server.pem", server_pem)
    _write(out_dir / "coordinator" / "server.key", server_key, private=True)
    admin_pem, admin_key = ca.issue("admin", "admin")
    _write(out_dir / "admin" / "admin.pem", admin_pem)
    _write(out_dir / "admin" / "admin.key", admin_key, private=True)
    kits = {s: write_site_kit(ca, s, out_dir / "sites" / s) for s in sites}
    return DevPKI(out_dir / "ca.pem", out_dir / "coordinator" / "server.pem", out_dir / "coordinator" / "server.key",
                  kits, out_dir / "admin" / "admin.pem", out_dir / "admin" / "admin.key")
