"""End to end with secure aggregation and local DP on: a real coordinator and 3 real site processes on loopback
with mutual TLS.

Sites clip and noise their deltas (egress filters), then mask them; the coordinator sees only masked inputs,
unmasks their sum, and publishes; each site's epsilon still travels in its signed envelope; the canary planted in
every site's training data never reaches the coordinator; an incompatible strategy is refused at start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coordinator.rounds.store import Store
from coordinator.server import read_recording
from fedcommon import tensors
from fedcommon.tomlconfig import dumps, load_toml
from sandbox import localfed

SECAGG = {"enabled": True, "threshold": 2, "stage_timeout_s": 120.0}


def _enable_secagg(fed: localfed.LocalFederation, **over: object) -> None:
    """Add the [secure_aggregation] table (and overrides) to the prepared federation.toml."""
    cfg = load_toml(fed.federation_toml)
    cfg["secure_aggregation"] = dict(SECAGG)
    cfg.update(over)
    fed.federation_toml.write_text(dumps(cfg))


@pytest.fixture(scope="module")
def secagg_federation(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                      canary: str) -> Iterator[localfed.LocalFederation]:
    """Three real sites, two rounds under secure aggregation and light local DP, every inbound byte recorded, a canary
    planted (the noise is small so that learning stays visible through the unmasked mean)."""
    fed = localfed.prepare(tmp_path_factory.mktemp("secagg"), tiny_model_dir, n_sites=3, rounds=2,
                           training={"max_steps": 6, "batch_size": 4, "learning_rate": 3e-3},
                           lora={"rank": 8, "alpha": 16.0, "target_modules": ["all-linear"]},
                           marker=canary, record_inbound=True, n_train=32, n_heldout=8,
                           privacy={"mode": "local", "noise_multiplier": 0.01, "clip_norm": 1.0})
    _enable_secagg(fed)
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            fed.start_site(s)
        codes = fed.wait([s.name for s in fed.sites] + ["coordinator"], timeout=600)
    assert codes == {"site-a": 0, "site-b": 0, "site-c": 0, "coordinator": 0}, (
        codes, localfed._tail(fed.log_path("coordinator")), localfed._tail(fed.log_path("site-a")))
    yield fed


def test_secure_rounds_unmask_the_sum_and_publish(secagg_federation: localfed.LocalFederation) -> None:
    fed = secagg_federation
    store = Store(fed.state_dir)
    rounds = store.rounds()
    assert [(r.round, r.state) for r in rounds] == [(1, "closed"), (2, "closed")]
    for r in rounds:
        info = r.info["secure_aggregation"]
        assert info["sites"] == ["site-a", "site-b", "site-c"] and info["dropped"] == []
        # The weights were summed masked; they add up to what the sites reported training on.
        reported = {m[1]: m[5] for m in store.metrics(r.round) if m[2] == "train"}
        assert len(reported) == 3 and info["total_weight"] == sum(reported.values())
        # What the coordinator stored per site is a masked int64 vector, not an adapter delta.
        for u in store.updates(r.round):
            stored = tensors.decode_state(u.path.read_bytes())
            assert set(stored) == {"secagg.masked"} and stored["secagg.masked"].dtype == torch.int64
    assert store.secagg_shares(1) == [] and store.secagg_reveals(2) == []
    # DP composes: each site's cumulative epsilon arrived in its signed (masked-payload) envelopes.
    eps = store.site_epsilon()
    assert set(eps) == {"site-a", "site-b", "site-c"} and all(e > 0 for e in eps.values())
    assert len(store.publications()) == 1 and Path(store.publications()[0]["path"]).is_dir()
    # The unmasked aggregate is a real mean of training updates: the union held-out loss fell.
    def union(r: int) -> float:
        ms = [m for m in store.metrics(r) if m[2] == "eval_global"]
        tok = {m[1]: m[4] for m in ms if m[3] == "tokens"}
        return sum(m[4] * tok[m[1]] for m in ms if m[3] == "loss") / sum(tok.values())
    assert union(3) < union(1) - 0.5


def test_canary_never_reaches_the_coordinator_with_secure_aggregation_and_dp(secagg_federation: localfed.LocalFederation,
                                                                      canary: str) -> None:
    fed = secagg_federation
    for s in fed.sites:
        assert canary in s.train_path.read_text()
    assert fed.record_inbound is not None
    recorded = read_recording(fed.record_inbound)
    methods = {m.rsplit("/", 1)[1] for m, _ in recorded}
    assert {"GetSettings", "AdvertiseKeys", "GetRoster", "ShareKeys", "GetShares", "UploadUpdate",
            "GetUnmaskRequest", "UnmaskShares"} <= methods
    assert sum(len(raw) for m, raw in recorded if m.endswith("/UploadUpdate")) > 6 * 100_000
    blob = b"".join(raw for _, raw in recorded)
    for form in (canary.encode(), canary.encode("utf-16-le"), canary.lower().encode(), canary[:16].encode()):
        assert form not in blob


def test_incompatible_strategy_is_refused_at_start(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: a robust rule, which needs every update on its own
    fed = localfed.prepare(tmp_path, tiny_model_dir, n_sites=3, rounds=1)
    _enable_secagg(fed, strategy="median")
    # Execute
    out = subprocess.run([sys.executable, "-m", "coordinator", "serve", "--config", str(fed.federation_toml)],
                         capture_output=True, text=True, timeout=120, cwd=Path(localfed.__file__).resolve().parent.parent,
                         env=dict(os.environ, COLUMNS="500"))  # rich would wrap the message
    # Assert
    assert out.returncode != 0
    assert "'median' cannot run with secure_aggregation" in out.stdout + out.stderr
    assert not (fed.state_dir / "coordinator.port").exists()
