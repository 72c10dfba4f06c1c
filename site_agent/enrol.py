"""Site-side enrolment: make this site's keys and CSR here, install the CA holder's bundle, renew with the same keys.

``fedbridge-site init --dir KIT --name NAME`` creates ``KIT/client.key`` (TLS, ECDSA P-256) and ``KIT/signing.key``
(Ed25519, signs update envelopes), both 0600 from creation, and ``KIT/client.csr``. The operator sends the CSR (it holds
public keys only) to the federation's CA holder, who runs ``fedbridge-admin enroll-site --csr`` and sends back a bundle
(:data:`fedcommon.csr.BUNDLE_FORMAT`, no private key). ``fedbridge-site install-bundle`` checks it against the kit's
keys and installs ``client.pem``, ``ca.pem``, the manifest and chat template, and a ``site.toml`` / ``policy.toml``
(written only when absent, so a renewal keeps the operator's edits). ``fedbridge-site renew`` makes ``KIT/renew.csr``
from the current keys for ``fedbridge-admin renew-site --csr``; the new bundle installs the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedcommon.csr import SIGNING_KEY, InstalledCertificate, install_certificate, make_request, renewal_request
from fedcommon.durable import write_durable
from fedcommon.tomlconfig import dumps

MANIFEST, TEMPLATE = "manifest.json", "chat_template.jinja"


SITE_HEADER = """\
fedbridge site config for this kit, written by `fedbridge-site install-bundle`. Replace every <FILL IN: ...>
below (`fedbridge-site run` and `preflight` refuse to start while one remains): base_model, your copy of the base
model, and data.train, your private training file (it never leaves the site). data.heldout, a held-out file scored
against each global model (only the metrics leave), is optional. docs/reference/site-toml.md has every setting;
`fedbridge-site config check site.toml` shows what this file resolves to."""


def kit_site_toml(name: str, coordinator: str) -> str:
    """The kit's commented ``site.toml``: the kit's own files filled in, placeholders for what only the site knows."""
    from fedcommon.configdoc import placeholder
    from site_agent.configdoc import site_starter

    return site_starter({
        "name": name, "coordinator": coordinator, "work_dir": "work", "policy": "policy.toml",
        "base_model": placeholder("path to your copy of the base model folder (the one the manifest pins)"),
        "tls": {"ca": "ca.pem", "cert": "client.pem", "key": "client.key", "signing_key": SIGNING_KEY},
        "data": {"train": placeholder("path to your private training jsonl")}}, SITE_HEADER)


def init_site(kit: Path, name: str) -> Path:
    """Create the site's keys and CSR in ``kit``; returns the CSR path (see the module docstring)."""
    return make_request(Path(kit), name, "site", signing=True)


def renew_site(kit: Path) -> Path:
    """A renewal CSR from the kit's current keys; returns its path."""
    return renewal_request(Path(kit))


def install_bundle(kit: Path, bundle: Path) -> InstalledCertificate:
    """Install an enrolment or renewal bundle into ``kit`` (raises :class:`fedcommon.csr.EnrolmentRequestError`)."""
    kit = Path(kit)
    got = install_certificate(kit, bundle)
    doc = got.bundle
    if doc.get("manifest"):
        write_durable(kit / MANIFEST, (json.dumps(doc["manifest"], indent=2, sort_keys=True) + "\n").encode())
    if doc.get("chat_template"):
        write_durable(kit / TEMPLATE, str(doc["chat_template"]).encode("utf-8"))
    address = str(doc.get("coordinator", ""))
    if not (kit / "site.toml").exists() and address:
        write_durable(kit / "site.toml", kit_site_toml(got.name, address).encode())
    manifest = doc.get("manifest") or {}
    if not (kit / "policy.toml").exists() and manifest.get("base_model_sha256") and address:
        write_durable(kit / "policy.toml", (
            "# What this site accepts from the coordinator (site_agent/policy.py). Pins the base model and the CA.\n"
            + dumps({"allowed_base_models": [manifest["base_model_sha256"]], "trusted_ca_sha256": [got.ca_sha256],
                     "trusted_coordinator_hosts": [address.rsplit(":", 1)[0].strip("[]")]})).encode())
    return got
