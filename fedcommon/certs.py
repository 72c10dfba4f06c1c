"""What a fedbridge certificate says: the private extension OIDs and the parsing of name, role, keys and region.

Certificates are issued by the coordinator's federation CA (:mod:`coordinator.trust.pki`); both sides read them:
the coordinator to learn who is on the other end of an mTLS connection, a site to check the other sites'
secure-aggregation keys. A site certificate carries the site's name as CN, its role as OU, its Ed25519
envelope-signing public key in :data:`SIGNING_KEY_OID` and its data region in :data:`REGION_OID`.

Enrolment is by certificate signing request (:func:`build_csr` on the site or admin host, :func:`read_csr` on the
CA host), so private keys never leave the host that made them. A CSR proves possession of the TLS key by its own
signature, and of the Ed25519 signing key by the :data:`SIGNING_POP_OID` extension: the raw 32-byte public key
followed by its 64-byte Ed25519 signature over :data:`POP_CONTEXT` + the CN (UTF-8) + a zero byte + the DER
SubjectPublicKeyInfo of the CSR's TLS key, so the proof cannot be lifted onto another name or TLS key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

# Private arc for fedbridge extensions: the raw Ed25519 public key that signs a site's update envelopes.
SIGNING_KEY_OID = x509.ObjectIdentifier("1.3.6.1.4.1.59862.1.1")
# The site's data region (e.g. ``EU-DE``), UTF-8: the coordinator learns a site's region from its certificate only.
REGION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.59862.1.2")
# In a CSR only: the signing public key and the proof that the requester holds its private half (module docstring).
SIGNING_POP_OID = x509.ObjectIdentifier("1.3.6.1.4.1.59862.1.3")
POP_CONTEXT = b"fedbridge signing-key possession v1\x00"
# Site and admin names (the certificate CN). A name becomes a file name on the coordinator, so it is checked with
# ``fullmatch`` everywhere (``match`` with ``$`` would let a trailing newline through).
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class CertificateError(ValueError):
    """A certificate is not valid PEM or its fedbridge fields are missing or malformed."""


@dataclass(frozen=True)
class CertIdentity:
    """Who a CA-signed certificate names.

    Attributes:
        name: The CN (site, admin or coordinator host name).
        role: The OU (``site``, ``admin``, ``coordinator`` or ``ca``).
        signing_key: The Ed25519 envelope-signing key bound by the CA (None when the certificate has none).
        serial: The certificate's serial number (what a CRL revokes).
        fingerprint: SHA-256 of the DER certificate, hex.
        region: The site's data region ("" when the certificate has none).
        not_after_ms: When the certificate expires, Unix ms (0: not known).
    """

    name: str
    role: str
    signing_key: Ed25519PublicKey | None
    serial: int
    fingerprint: str
    region: str = ""
    not_after_ms: int = 0


def load_pem(cert_pem: bytes) -> x509.Certificate:
    """The first certificate of ``cert_pem``.

    Raises:
        CertificateError: Not a PEM certificate.
    """
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise CertificateError(f"certificate is not valid PEM: {e}") from None


def identity(cert: x509.Certificate) -> CertIdentity:
    """Read name, role, signing key and region from a certificate (its chain is checked elsewhere).

    Raises:
        CertificateError: Not exactly one CN and one OU, a malformed signing-key extension, or a region that is not
            UTF-8.
    """
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cns) != 1 or len(ous) != 1:  # two CNs would let a certificate name two sites
        raise CertificateError("certificate must have exactly one CN and one OU")
    signing_key = None
    try:
        raw = cert.extensions.get_extension_for_oid(SIGNING_KEY_OID).value.value  # type: ignore[attr-defined]
        signing_key = Ed25519PublicKey.from_public_bytes(raw)
    except x509.ExtensionNotFound:
        pass
    except ValueError as e:
        raise CertificateError(f"certificate's signing-key extension is malformed: {e}") from None
    region = ""
    try:
        region = cert.extensions.get_extension_for_oid(REGION_OID).value.value.decode()  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        pass
    except UnicodeDecodeError:
        raise CertificateError("certificate's region extension is not UTF-8") from None
    return CertIdentity(name=str(cns[0].value), role=str(ous[0].value), signing_key=signing_key,
                        serial=cert.serial_number, fingerprint=cert.fingerprint(hashes.SHA256()).hex(), region=region,
                        not_after_ms=int(cert.not_valid_after_utc.timestamp() * 1000))


def ca_sha256(cert: x509.Certificate | bytes) -> str:
    """SHA-256 (hex) over the DER form of a certificate, or of the first one in PEM bytes.

    This is the CA fingerprint the coordinator writes into a site's ``policy.toml`` (``trusted_ca_sha256``) and the
    site checks its kit's CA against, so both sides must compute it here.
    """
    loaded = load_pem(cert) if isinstance(cert, bytes) else cert
    return hashlib.sha256(loaded.public_bytes(Encoding.DER)).hexdigest()


def _pop_message(name: str, tls_public: ec.EllipticCurvePublicKey) -> bytes:
    return POP_CONTEXT + name.encode() + b"\x00" + tls_public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def build_csr(name: str, role: str, tls_key: ec.EllipticCurvePrivateKey,
              signing_key: Ed25519PrivateKey | None = None) -> bytes:
    """A PEM CSR for ``name`` (CN) and ``role`` (OU), signed by ``tls_key``, carrying ``signing_key``'s proof.

    Raises:
        ValueError: ``name`` is not a valid site or admin name (:data:`SITE_NAME`), so the CA holder would refuse it.
    """
    from cryptography.x509.oid import NameOID as N

    if not SITE_NAME.fullmatch(name):
        raise ValueError(f"invalid name {name[:80]!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")

    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
        x509.NameAttribute(N.COMMON_NAME, name), x509.NameAttribute(N.ORGANIZATIONAL_UNIT_NAME, role)]))
    if signing_key is not None:
        raw = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        pop = signing_key.sign(_pop_message(name, tls_key.public_key()))
        b = b.add_extension(x509.UnrecognizedExtension(SIGNING_POP_OID, raw + pop), critical=False)
    return b.sign(tls_key, hashes.SHA256()).public_bytes(Encoding.PEM)


@dataclass(frozen=True)
class CsrRequest:
    """What a checked CSR asks for: the name, the role, and the keys whose possession it proved."""

    name: str
    role: str
    tls_public_key: ec.EllipticCurvePublicKey
    signing_key: Ed25519PublicKey | None


def tls_key_sha256(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 (hex) over the DER SubjectPublicKeyInfo of a TLS public key (how renewal recognises the same key)."""
    return hashlib.sha256(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def signing_key_hex(key: Ed25519PublicKey | None) -> str:
    """The raw Ed25519 public key as hex ("" for none)."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex() if key is not None else ""


def read_csr(csr_pem: bytes, where: str = "CSR") -> CsrRequest:
    """Parse and check a CSR: PEM, its own signature (possession of the TLS key), one CN and one OU, a P-256 key,
    and the signing-key proof when present.

    Raises:
        CertificateError: Naming ``where`` and what is wrong.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise CertificateError(f"{where}: not a PEM certificate signing request ({e})") from None
    if not csr.is_signature_valid:
        raise CertificateError(f"{where}: the CSR's signature does not verify (no proof of the TLS key)")
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise CertificateError(f"{where}: the TLS key must be an ECDSA P-256 key")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cns) != 1 or len(ous) != 1:
        raise CertificateError(f"{where}: the subject must have exactly one CN and one OU")
    name, role = str(cns[0].value), str(ous[0].value)
    signing: Ed25519PublicKey | None = None
    try:
        blob = csr.extensions.get_extension_for_oid(SIGNING_POP_OID).value.value  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        blob = None
    if blob is not None:
        if len(blob) != 96:
            raise CertificateError(f"{where}: the signing-key extension must be 32 key bytes + a 64-byte signature")
        signing = Ed25519PublicKey.from_public_bytes(blob[:32])
        try:
            signing.verify(blob[32:], _pop_message(name, public))
        except InvalidSignature:
            raise CertificateError(f"{where}: the signing-key proof of possession does not verify") from None
    return CsrRequest(name=name, role=role, tls_public_key=public, signing_key=signing)


def check_tls_files(ca: Path, cert: Path, key: Path, table: str = "tls") -> None:
    """Check a TLS kit before it is handed to gRPC, so a broken one gets a line naming its file, not a handshake
    failure later: each file readable PEM, the key the certificate's, the certificate valid now and issued by the CA.

    Args:
        ca: The CA certificate the peer must chain to (``[tls] ca``).
        cert: This side's certificate (``[tls] cert``).
        key: Its private key (``[tls] key``).
        table: The config table the three come from, for the message (``field 'tls.cert' (PATH): ...``).

    Raises:
        CertificateError: The first problem found, naming the field and the file.
    """
    import datetime as dt

    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    def read(field: str, path: Path) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise CertificateError(f"field '{table}.{field}' ({path}): cannot read ({e.strerror or e})") from None

    def where(field: str, path: Path) -> str:
        return f"field '{table}.{field}' ({path})"

    ca_pem, cert_pem, key_pem = read("ca", ca), read("cert", cert), read("key", key)
    try:
        ca_certs = x509.load_pem_x509_certificates(ca_pem)  # a bundle may hold more than one (a CA rotation)
    except ValueError:
        raise CertificateError(f"{where('ca', ca)}: not a PEM certificate") from None
    try:
        own = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CertificateError(f"{where('cert', cert)}: not a PEM certificate") from None
    try:
        private = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise CertificateError(f"{where('key', key)}: not an unencrypted PEM private key") from None
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != own.public_key().public_bytes(*spki):  # type: ignore[union-attr]
        raise CertificateError(f"{where('key', key)}: is not the key of the certificate {cert}")
    now = dt.datetime.now(dt.timezone.utc)
    if own.not_valid_after_utc < now:
        raise CertificateError(f"{where('cert', cert)}: expired on {own.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                               "renew it (fedbridge-site renew)")
    if own.not_valid_before_utc > now:
        raise CertificateError(f"{where('cert', cert)}: not valid before {own.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                               "(check this host's clock)")
    for ca_cert in ca_certs:
        try:
            own.verify_directly_issued_by(ca_cert)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise CertificateError(f"{where('cert', cert)}: not issued by the CA in {where('ca', ca)} (a certificate "
                           "from another federation?)")
