"""Fed-SB's output is the mean of the R matrices: federation.toml accepts it with secure aggregation and central DP."""

from __future__ import annotations

from pathlib import Path

from tests.coordinator.coord_helpers import config

CENTRAL = {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 1.0}


def test_fed_sb_runs_with_secure_aggregation_and_with_central_dp(tmp_path: Path) -> None:
    cfg = config(tmp_path, tmp_path, strategy="fed-sb", min_sites=3, secure_aggregation={"enabled": True, "threshold": 2})
    assert cfg.secure_aggregation.enabled and cfg.strategy == "fed-sb"
    assert config(tmp_path, tmp_path, strategy="fed-sb", privacy=CENTRAL).privacy.mode == "central"
