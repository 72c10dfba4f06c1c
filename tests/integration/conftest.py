"""Fixtures that run real coordinator and site processes on loopback with mTLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import localfed

MARKER = "FEDBRIDGE-CANARY-7f3a9c2e-PRIVATE"


@pytest.fixture(scope="session")
def canary() -> str:
    return MARKER


@pytest.fixture(scope="module")
def finished_federation(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[localfed.LocalFederation]:
    """Two real sites, two rounds, every inbound byte recorded, a canary planted in every site's training data."""
    fed = localfed.prepare(tmp_path_factory.mktemp("fed"), tiny_model_dir, n_sites=2, rounds=2,
                           training={"max_steps": 8, "batch_size": 4, "learning_rate": 3e-3},
                           lora={"rank": 8, "alpha": 16.0, "target_modules": ["all-linear"]},
                           marker=MARKER, record_inbound=True, n_train=32, n_heldout=8)
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            fed.start_site(s)
        codes = fed.wait([s.name for s in fed.sites] + ["coordinator"], timeout=400)
    assert codes == {"site-a": 0, "site-b": 0, "coordinator": 0}, (
        codes, localfed._tail(fed.log_path("coordinator")), localfed._tail(fed.log_path("site-a")))
    yield fed
