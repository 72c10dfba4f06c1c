"""End to end with local DP on: real coordinator and 2 real site processes over mTLS, the federation asks for
site-side clipping and Gaussian noise, each site's policy sets a noise floor and an epsilon budget. The canary
planted in the training data never reaches the coordinator, and the published model card states each site's epsilon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.release.modelcard import parse_model_card
from coordinator.rounds.store import Store
from coordinator.server import read_recording
from fedcommon.dp import rdp_epsilon
from protos.fedbridge.v1 import federation_service_pb2 as pb
from sandbox import localfed
from site_agent.egress.dp import PrivacyLedger

SIGMA, CLIP, DELTA = 1.2, 0.05, 1e-5


@pytest.fixture(scope="module")
def dp_federation(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                  canary: str) -> Iterator[localfed.LocalFederation]:
    fed = localfed.prepare(tmp_path_factory.mktemp("fed-dp"), tiny_model_dir, n_sites=2, rounds=2,
                           training={"max_steps": 4, "batch_size": 4, "learning_rate": 3e-3},
                           lora={"rank": 8, "alpha": 16.0, "target_modules": ["all-linear"]},
                           marker=canary, record_inbound=True, n_train=16, n_heldout=4,
                           privacy={"mode": "local", "noise_multiplier": SIGMA, "clip_norm": CLIP})
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            policy = fed.root / "sites" / s.name / "policy.toml"
            policy.parent.mkdir(parents=True, exist_ok=True)
            policy.write_text(f"min_dp_noise_multiplier = 1.0\ndp_epsilon_budget = 50.0\ndp_delta = {DELTA}\n")
            fed.start_site(s, extra={"policy": str(policy)})
        codes = fed.wait([s.name for s in fed.sites] + ["coordinator"], timeout=400)
    assert codes == {"site-a": 0, "site-b": 0, "coordinator": 0}, (
        codes, localfed._tail(fed.log_path("coordinator")), localfed._tail(fed.log_path("site-a")))
    yield fed


def test_canary_never_reaches_the_coordinator_with_dp_on(dp_federation: localfed.LocalFederation, canary: str) -> None:
    fed = dp_federation
    for s in fed.sites:
        assert canary in s.train_path.read_text()
    assert fed.record_inbound is not None
    recorded = read_recording(fed.record_inbound)
    assert sum(len(raw) for m, raw in recorded if m.endswith("/UploadUpdate")) > 4 * 100_000
    blob = b"".join(raw for _, raw in recorded)
    for form in (canary.encode(), canary.encode("utf-16-le"), canary.lower().encode(), canary[:16].encode()):
        assert form not in blob


def test_each_site_accounts_epsilon_and_the_card_states_it(dp_federation: localfed.LocalFederation) -> None:
    fed = dp_federation
    store = Store(fed.state_dir)
    want = rdp_epsilon([(SIGMA, 1.0, 2)], DELTA)
    # Each site's ledger holds its two noised releases; its latest signed envelope carries the cumulative epsilon.
    for s in fed.sites:
        ledger = PrivacyLedger(fed.root / "sites" / s.name / "work" / "privacy_ledger.json")
        assert [(e.round, e.noise_multiplier) for e in ledger.entries] == [(1, SIGMA), (2, SIGMA)]
    assert store.site_epsilon() == pytest.approx({"site-a": want, "site-b": want})
    envs = [pb.UpdateEnvelope.FromString(u["envelope"]) for u in store.ledger()]
    assert sorted(e.epsilon_spent for e in envs) == pytest.approx([rdp_epsilon([(SIGMA, 1.0, 1)], DELTA)] * 2 + [want] * 2)
    assert {e.dp_delta for e in envs} == {DELTA}
    # The published card states each site's epsilon, delta and the unit of privacy.
    [pub] = store.publications()
    meta, body = parse_model_card((Path(pub["path"]) / "README.md").read_text())
    fb = meta["fedbridge"]
    assert fb["dp_epsilon"] == pytest.approx({"site-a": want, "site-b": want})
    assert fb["dp"]["mode"] == "local" and fb["dp"]["delta"] == {"site-a": DELTA, "site-b": DELTA}
    assert "site-level" in fb["dp"]["unit"] and "Renyi DP" in body
    assert f"| site-a | unspecified | 1, 2 | {want:g} |" in body
