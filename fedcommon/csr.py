"""The requesting side of enrolment, shared by sites and admins: make keys here, send a CSR, install the bundle.

A site (``fedbridge-site init``) or an administrator (``fedbridge-admin admin-csr``) creates its TLS key and, for a
site, its Ed25519 signing key in its own kit folder (0600 from creation), and a CSR (:func:`fedcommon.certs.build_csr`)
that proves it holds both. The CA holder signs the CSR and sends back a *bundle*: a JSON file with no private key in
it (:data:`BUNDLE_FORMAT`: the certificate, the CA certificate and its SHA-256, the coordinator address and, for
a site, the federation manifest and chat template). :func:`install_certificate` checks that the bundle's certificate
is for this kit's keys and chains to its CA, and installs it; renewal is a new CSR from the same keys
(:func:`renewal_request`), signed and installed the same way.

Kit files: ``client.key`` (TLS), ``signing.key`` (sites), ``client.csr`` / ``renew.csr``, and after install
``client.pem`` and ``ca.pem``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcommon import certs
from fedcommon.durable import write_durable, write_private

BUNDLE_FORMAT = "fedbridge-bundle-v1"
TLS_KEY, SIGNING_KEY, CERT, CA, CSR, RENEW_CSR = "client.key", "signing.key", "client.pem", "ca.pem", "client.csr", "renew.csr"


class EnrolmentRequestError(ValueError):
    """A kit cannot make a request or install a bundle (the message names the file and what is wrong)."""


def _pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_request(kit: Path, name: str, role: str, signing: bool) -> Path:
    """Create the kit's private keys (0600 from creation) and its CSR; returns the CSR path.

    Raises:
        EnrolmentRequestError: The kit already holds a key (never overwritten: renew with :func:`renewal_request`).
    """
    kit = Path(kit)
    for f in (TLS_KEY, SIGNING_KEY):
        if (kit / f).exists():
            raise EnrolmentRequestError(f"{kit / f} already exists; refusing to replace a key (renew with the "
                                        "current keys instead, or start a new kit folder)")
    tls = ec.generate_private_key(ec.SECP256R1())
    sign = Ed25519PrivateKey.generate() if signing else None
    csr = certs.build_csr(name, role, tls, sign)  # before anything is written: a bad name writes nothing
    write_private(kit / TLS_KEY, _pem(tls))
    if sign is not None:
        write_private(kit / SIGNING_KEY, _pem(sign))
    write_durable(kit / CSR, csr)
    return kit / CSR


def _load_keys(kit: Path) -> tuple[ec.EllipticCurvePrivateKey, Ed25519PrivateKey | None]:
    try:
        tls = serialization.load_pem_private_key((kit / TLS_KEY).read_bytes(), password=None)
    except FileNotFoundError:
        raise EnrolmentRequestError(f"{kit / TLS_KEY}: no TLS key in this kit (run init first)") from None
    except ValueError as e:
        raise EnrolmentRequestError(f"{kit / TLS_KEY}: not a PEM private key ({e})") from None
    if not isinstance(tls, ec.EllipticCurvePrivateKey):
        raise EnrolmentRequestError(f"{kit / TLS_KEY}: the TLS key must be an EC key")
    sign = None
    if (kit / SIGNING_KEY).exists():
        try:
            k = serialization.load_pem_private_key((kit / SIGNING_KEY).read_bytes(), password=None)
        except ValueError as e:
            raise EnrolmentRequestError(f"{kit / SIGNING_KEY}: not a PEM private key ({e})") from None
        if not isinstance(k, Ed25519PrivateKey):
            raise EnrolmentRequestError(f"{kit / SIGNING_KEY}: the signing key must be an Ed25519 key")
        sign = k
    return tls, sign


def renewal_request(kit: Path) -> Path:
    """A CSR from the kit's current keys, for the name and role of its installed certificate; returns its path."""
    kit = Path(kit)
    try:
        ident = certs.identity(certs.load_pem((kit / CERT).read_bytes()))
    except FileNotFoundError:
        raise EnrolmentRequestError(f"{kit / CERT}: no certificate installed yet; install the enrolment bundle "
                                    "first") from None
    except certs.CertificateError as e:
        raise EnrolmentRequestError(f"{kit / CERT}: {e}") from None
    tls, sign = _load_keys(kit)
    write_durable(kit / RENEW_CSR, certs.build_csr(ident.name, ident.role, tls, sign))
    return kit / RENEW_CSR


@dataclass(frozen=True)
class InstalledCertificate:
    """What :func:`install_certificate` installed."""

    name: str
    role: str
    not_after: dt.datetime
    ca_sha256: str
    bundle: dict[str, Any]


def read_bundle(path: Path) -> dict[str, Any]:
    """Parse a bundle file; raises :class:`EnrolmentRequestError` naming the file and field."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EnrolmentRequestError(f"{path}: bundle not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise EnrolmentRequestError(f"{path}: not a JSON bundle ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
        raise EnrolmentRequestError(f"{path}: field 'format' must be {BUNDLE_FORMAT!r}")
    for f in ("cert", "ca", "ca_sha256", "name", "role"):
        if not isinstance(doc.get(f), str) or not doc[f]:
            raise EnrolmentRequestError(f"{path}: field {f!r} is missing or not a string")
    if "PRIVATE KEY" in json.dumps(doc):
        raise EnrolmentRequestError(f"{path}: the bundle holds a private key; refusing it (keys never travel)")
    return doc


def install_certificate(kit: Path, bundle_path: Path) -> InstalledCertificate:
    """Check a bundle against this kit and install its certificate and CA certificate.

    The certificate must be for this kit's TLS key and signing key, must be signed by the bundle's CA, and the CA
    must match its stated SHA-256 and, if the kit already has a CA (a renewal), be that same CA.

    Raises:
        EnrolmentRequestError: Naming the file and the mismatch; nothing is written then.
    """
    kit = Path(kit)
    doc = read_bundle(bundle_path)
    try:
        cert = certs.load_pem(doc["cert"].encode())
        ca = certs.load_pem(doc["ca"].encode())
        ident = certs.identity(cert)
    except certs.CertificateError as e:
        raise EnrolmentRequestError(f"{bundle_path}: {e}") from None
    if certs.ca_sha256(ca) != doc["ca_sha256"]:
        raise EnrolmentRequestError(f"{bundle_path}: the CA certificate does not match field 'ca_sha256'")
    if (kit / CA).exists() and certs.ca_sha256((kit / CA).read_bytes()) != doc["ca_sha256"]:
        raise EnrolmentRequestError(f"{bundle_path}: signed by a different CA than {kit / CA}; refusing to switch "
                                    "CAs on a renewal (start a new kit to join another federation)")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise EnrolmentRequestError(f"{bundle_path}: the certificate is not signed by the bundle's CA ({e})") from None
    tls, sign = _load_keys(kit)
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(der, spki) != tls.public_key().public_bytes(der, spki):
        raise EnrolmentRequestError(f"{bundle_path}: the certificate is not for this kit's TLS key {kit / TLS_KEY}")
    want_sign = certs.signing_key_hex(sign.public_key()) if sign else ""
    if certs.signing_key_hex(ident.signing_key) != want_sign:
        raise EnrolmentRequestError(f"{bundle_path}: the certificate's signing key is not this kit's "
                                    f"{kit / SIGNING_KEY}")
    write_durable(kit / CA, doc["ca"].encode())
    write_durable(kit / CERT, doc["cert"].encode())  # last: a kit with a certificate is a complete kit
    return InstalledCertificate(ident.name, ident.role, cert.not_valid_after_utc, doc["ca_sha256"], doc)
