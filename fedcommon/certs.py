"""What a fedbridge certificate says: the private extension OIDs and the parsing of name, role, keys and region.

Certificates are issued by the coordinator's federation CA (:mod:`coordinator.trust.pki`); both sides read them:
the coordinator to learn who is on the other end of an mTLS connection, a site to check the other sites'
secure-aggregation keys. A site certificate carries the site's name as CN, its role as OU, its Ed25519
envelope-signing public key in :data:`SIGNING_KEY_OID` and its data region in :data:`REGION_OID`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

# Private arc for fedbridge extensions: the raw Ed25519 public key that signs a site's update envelopes.
SIGNING_KEY_OID = x509.ObjectIdentifier("1.3.6.1.4.1.59862.1.1")
# The site's data region (e.g. ``EU-DE``), UTF-8: the coordinator learns a site's region from its certificate only.
REGION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.59862.1.2")


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
    """

    name: str
    role: str
    signing_key: Ed25519PublicKey | None
    serial: int
    fingerprint: str
    region: str = ""


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
                        serial=cert.serial_number, fingerprint=cert.fingerprint(hashes.SHA256()).hex(), region=region)


def ca_sha256(cert: x509.Certificate | bytes) -> str:
    """SHA-256 (hex) over the DER form of a certificate, or of the first one in PEM bytes.

    This is the CA fingerprint the coordinator writes into a site's ``policy.toml`` (``trusted_ca_sha256``) and the
    site checks its kit's CA against, so both sides must compute it here.
    """
    loaded = load_pem(cert) if isinstance(cert, bytes) else cert
    return hashlib.sha256(loaded.public_bytes(Encoding.DER)).hexdigest()
