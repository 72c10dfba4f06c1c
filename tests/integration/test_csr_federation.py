"""End to end with CSR enrolment: a CA apart from the coordinator, two sites that made their own keys, their CSRs
signed into bundles and installed, then a real one-round federation with the registry and the CRL enforced."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.rounds.store import Store
from sandbox import localfed


def test_two_csr_enrolled_sites_run_a_round(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Prepare: sites enrolled by CSR (sandbox.localfed csr_enrolment)
    root = tmp_path_factory.mktemp("csrfed")
    fed = localfed.prepare(root, tiny_model_dir, n_sites=2, rounds=1, csr_enrolment=True,
                           training={"max_steps": 2, "batch_size": 4, "learning_rate": 3e-3},
                           lora={"rank": 4, "alpha": 8.0, "target_modules": ["all-linear"]}, n_train=16, n_heldout=4)
    site_keys = {name: {(kit / f).read_bytes().strip() for f in ("client.key", "signing.key")}
                 for name, kit in fed.site_kits.items()}
    # Execute
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            fed.start_site(s)
        codes = fed.wait([s.name for s in fed.sites] + ["coordinator"], timeout=300)
    # Assert: the round ran with both sites ...
    assert codes == {"site-a": 0, "site-b": 0, "coordinator": 0}, (
        codes, localfed._tail(fed.log_path("coordinator")), localfed._tail(fed.log_path("site-a")))
    store = Store(fed.state_dir)
    assert [u.site for u in store.updates(1)] == ["site-a", "site-b"]
    # ... and no site's private key is on the CA's side or in any coordinator folder
    for folder in (root / "ca", root / "pki", root / "coordinator"):
        for f in folder.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                assert not any(k in data for keys in site_keys.values() for k in keys), f
    assert not list((root / "pki").rglob("ca.key")) and not list((root / "coordinator").rglob("ca.key"))
