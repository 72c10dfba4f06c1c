"""Clock skew of +-1 h at a site: site-a runs under libfaketime (``LD_PRELOAD``, ``FAKETIME=+1h`` / ``-1h``), so
its Python code, its TLS library (certificate validity) and everything else in that process see the shifted wall
clock; the coordinator and site-b keep the real one.

What a skewed site clock touches: the validity windows of the certificates it checks (its own, the CA's, the
coordinator's: a freshly issued certificate is not yet valid to a clock behind by 1 h unless issuance backdates it),
and the signed ``created_unix_ms`` of its envelopes, which the coordinator accepts within ``envelope_clock_skew_s``
(1 h) of its own clock. The published adapter must equal the reference run's: a clock changes no training input.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import faultkit
import pytest

from sandbox import localfed

LIBFAKETIME = next((p for p in (Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
                                Path("/usr/lib/faketime/libfaketime.so.1"),
                                Path("/usr/lib64/faketime/libfaketime.so.1")) if p.exists()), None)

needs_faketime = pytest.mark.skipif(LIBFAKETIME is None, reason="libfaketime is not installed (apt-get install "
                                    "faketime; deploy/setup.sh does it with the dev extras)")


@needs_faketime
@pytest.mark.slow
@pytest.mark.parametrize("shift", ["+1h", "-1h"])
def test_site_with_a_clock_off_by_an_hour_completes_to_the_reference_adapter(
        shift: str, tiny_model_dir: Path, tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    # Prepare: site-a's process under libfaketime, its clock shifted by `shift` (and running at normal speed)
    fed = faultkit.prepare(tmp_path / "fed", tiny_model_dir)
    env = shutil.which("env")
    assert env is not None
    fed.wrap["site-a"] = [env, f"LD_PRELOAD={LIBFAKETIME}", f"FAKETIME={shift}", "FAKETIME_DONT_RESET=1",
                          "FAKETIME_DONT_FAKE_MONOTONIC=1"]  # a skewed wall clock; monotonic time is not skew

    # Execute
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            fed.start_site(s)
        faultkit.finish(fed, timeout=400)

    # Assert: everyone finished (above), the skew really applied (the site's audit log stamps its own clock), each
    # update counted once, same adapter
    faultkit.assert_each_update_once(fed)
    faultkit.assert_same_adapter(faultkit.published(fed), reference.adapter)
    _assert_skewed(fed, shift)


def _assert_skewed(fed: localfed.LocalFederation, shift: str) -> None:
    import datetime as dt
    import json

    def stamps(site: str) -> list[dt.datetime]:
        lines = (fed.root / "sites" / site / "work" / "audit.jsonl").read_text().splitlines()
        return [dt.datetime.fromisoformat(json.loads(line)["ts"].replace("Z", "+00:00")) for line in lines[:1]]

    (a,), (b,) = stamps("site-a"), stamps("site-b")
    off = (a - b).total_seconds()
    assert abs(off - (3600 if shift == "+1h" else -3600)) < 600, off


def test_freshly_issued_certificates_are_valid_to_a_clock_an_hour_behind(tmp_path: Path) -> None:
    # The cheap form of the -1 h case (default run): every certificate of a new PKI (CA, coordinator, site) is valid
    # already at "now - 1 h" by the issuer's clock, and still valid for its full term from there.
    import datetime as dt

    from cryptography import x509

    from coordinator.trust.pki import create_dev_pki

    pki = create_dev_pki(tmp_path / "pki", ["site-a"])
    behind = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    for pem in (pki.ca_cert, pki.server_cert, pki.sites["site-a"].dir / "client.pem"):
        cert = x509.load_pem_x509_certificate(Path(pem).read_bytes())
        assert cert.not_valid_before_utc <= behind < cert.not_valid_after_utc, (pem, cert.not_valid_before_utc)
