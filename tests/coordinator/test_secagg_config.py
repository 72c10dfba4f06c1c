"""Secure aggregation is refused at start, with the reason, for rules that need individual updates."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcommon.tomlconfig import ConfigError
from tests.coordinator.coord_helpers import config

SECAGG = {"enabled": True, "threshold": 2}


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "krum", "multikrum", "fedex_lora", "flora", "flexlora",
                                      "hetlora"])
def test_rules_that_need_individual_updates_are_refused(tmp_path: Path, strategy: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=f"'{strategy}' cannot run with secure_aggregation"):
        config(tmp_path, tmp_path, strategy=strategy, min_sites=3, secure_aggregation=SECAGG)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam", "ffa_lora"])
def test_linear_rules_run_with_secure_aggregation(tmp_path: Path, strategy: str) -> None:
    cfg = config(tmp_path, tmp_path, strategy=strategy, min_sites=3, secure_aggregation=SECAGG)
    assert cfg.secure_aggregation.enabled and cfg.strategy == strategy


def test_coordinator_side_clipping_and_a_small_quorum_are_refused(tmp_path: Path) -> None:
    with pytest.raises((ConfigError, ValueError), match="clip at the sites"):
        config(tmp_path, tmp_path, strategy_params={"clip_norm": 1.0}, min_sites=3, secure_aggregation=SECAGG)
    with pytest.raises((ConfigError, ValueError), match="below secure_aggregation.threshold"):
        config(tmp_path, tmp_path, min_sites=2, secure_aggregation={"enabled": True, "threshold": 3})
    with pytest.raises((ConfigError, ValueError), match="secure_aggregation.bits"):
        config(tmp_path, tmp_path, min_sites=3, secure_aggregation={"enabled": True, "bits": 60})
    with pytest.raises((ConfigError, ValueError), match="central DP clips each update"):
        config(tmp_path, tmp_path, min_sites=3, secure_aggregation=SECAGG,
               privacy={"mode": "central", "noise_multiplier": 1.0, "clip_norm": 1.0})
    # local DP composes (sites clip and noise before masking)
    assert config(tmp_path, tmp_path, min_sites=3, secure_aggregation=SECAGG,
                  privacy={"mode": "local", "noise_multiplier": 1.0, "clip_norm": 1.0}).secure_aggregation.enabled
    # off by default, and then nothing is checked
    assert not config(tmp_path, tmp_path, strategy="median").secure_aggregation.enabled
