"""Reading a fedbridge certificate: CN, OU, the bound signing key, the region, and the CA fingerprint."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from fedcommon.certs import REGION_OID, SIGNING_KEY_OID, CertificateError, ca_sha256, identity, load_pem


def _cert(names: list[x509.NameAttribute], extensions: dict[x509.ObjectIdentifier, bytes]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name(names)).issuer_name(x509.Name(names))
         .public_key(key.public_key()).serial_number(42).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)))
    for oid, value in extensions.items():
        b = b.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    return b.sign(key, hashes.SHA256())


def _site(cn: str = "lab-a", ou: str = "site") -> list[x509.NameAttribute]:
    return [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou)]


def test_identity_reads_every_field() -> None:
    signing = Ed25519PrivateKey.generate().public_key()
    raw = signing.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    cert = _cert(_site(), {SIGNING_KEY_OID: raw, REGION_OID: b"EU-DE"})
    ident = identity(load_pem(cert.public_bytes(serialization.Encoding.PEM)))
    assert (ident.name, ident.role, ident.serial, ident.region) == ("lab-a", "site", 42, "EU-DE")
    assert ident.signing_key is not None and ident.signing_key.public_bytes_raw() == raw
    assert ident.fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    bare = identity(_cert(_site("admin", "admin"), {}))
    assert (bare.signing_key, bare.region) == (None, "")


@pytest.mark.parametrize(("names", "extensions", "match"), [
    (_site()[:1], {}, "exactly one CN and one OU"),
    ([*_site(), x509.NameAttribute(NameOID.COMMON_NAME, "lab-b")], {}, "exactly one CN and one OU"),
    (_site(), {SIGNING_KEY_OID: b"short"}, "signing-key extension is malformed"),
    (_site(), {REGION_OID: b"\xff"}, "region extension is not UTF-8"),
])
def test_identity_refuses_malformed_certificates(names: list[x509.NameAttribute],
                                                 extensions: dict[x509.ObjectIdentifier, bytes], match: str) -> None:
    with pytest.raises(CertificateError, match=match):
        identity(_cert(names, extensions))


def test_load_pem_refuses_garbage() -> None:
    with pytest.raises(CertificateError, match="not valid PEM"):
        load_pem(b"not a certificate")


def test_ca_sha256_is_over_der_from_pem_or_certificate() -> None:
    cert = _cert(_site("fedbridge federation CA", "ca"), {})
    want = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert ca_sha256(cert) == ca_sha256(cert.public_bytes(serialization.Encoding.PEM)) == want
