"""Central DP: the [privacy] block is checked at start, the coordinator clips each update and noises the mean with
std sigma * C / n, accounts epsilon per round, and the model card states it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from coord_helpers import config, run_federation, small_delta

from coordinator.config import LoraSpec, PrivacySpec
from coordinator.privacy.central_dp import CentralDp, clip_filter
from coordinator.release.modelcard import parse_model_card
from coordinator.rounds.adapter import init_adapter
from fedcommon.dp import rdp_epsilon
from strategies.clipping import l2_norm
from strategies.registry import build_strategy
from strategies.types import ClientUpdate


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "krum", "multikrum", "flora", "fedex_lora", "hetlora",
                                      "flexlora", "ffa_lora"])
def test_central_dp_is_refused_with_rules_not_built_on_the_mean(tmp_path: Path, strategy: str) -> None:
    with pytest.raises(ValueError, match=rf"field 'privacy.mode': central DP .* strategy '{strategy}' does not "
                                         r"aggregate through that mean.*Use privacy.mode = 'local'"):
        config(tmp_path, tmp_path, strategy=strategy,
               privacy={"mode": "central", "noise_multiplier": 1.0, "clip_norm": 1.0})
    # Local DP (site-side noise) composes with any rule.
    config(tmp_path, tmp_path, strategy=strategy, privacy={"mode": "local", "noise_multiplier": 1.0, "clip_norm": 1.0})


def test_privacy_block_is_checked() -> None:
    with pytest.raises(ValueError, match="field 'privacy.mode': 'global'"):
        PrivacySpec(mode="global")
    with pytest.raises(ValueError, match="field 'privacy.noise_multiplier': mode 'local' needs"):
        PrivacySpec(mode="local", clip_norm=1.0)
    with pytest.raises(ValueError, match="field 'privacy.clip_norm': mode 'central' needs"):
        PrivacySpec(mode="central", noise_multiplier=1.0)
    with pytest.raises(ValueError, match="field 'privacy.delta'"):
        PrivacySpec(delta=1.0)
    assert PrivacySpec().mode == "none"


def test_aggregate_noise_has_std_sigma_c_over_n_and_updates_are_clipped() -> None:
    # Prepare: 4 sites whose updates are far above the bound C = 0.5, with very different example counts
    shapes = {"m.lora_A.weight": (8, 256), "m.lora_B.weight": (256, 8)}
    g = torch.Generator().manual_seed(0)
    updates = [ClientUpdate(f"s{i}", {k: torch.randn(s, generator=g) * 10 for k, s in shapes.items()}, 10 ** i)
               for i in range(4)]
    global_state = {k: torch.zeros(s) for k, s in shapes.items()}
    dp = CentralDp(noise_multiplier=2.0, clip_norm=0.5, delta=1e-5, generator=torch.Generator().manual_seed(3))

    # Execute
    noised, info = dp.privatize(updates, prior_rounds=[])
    result = build_strategy("fedavg").aggregate(global_state, noised, None)

    # Assert: the aggregate = uniform mean of the clipped updates + noise of std sigma * C / n = 0.25
    clipped = clip_filter(updates, 0.5)
    assert all(l2_norm(c.delta) == pytest.approx(0.5, rel=1e-5) for c in clipped)
    assert all(u.num_examples == 1 for u in noised)
    mean = {k: sum(c.delta[k] for c in clipped) / 4 for k in shapes}
    noise = torch.cat([(result.state[k] - mean[k]).flatten().double() for k in shapes])
    assert info["noise_std"] == 0.25
    assert noise.std().item() == pytest.approx(0.25, rel=0.03)  # 4096 draws: standard error ~1.1%
    assert info["epsilon"] == pytest.approx(rdp_epsilon([(2.0, 1.0, 1)], 1e-5))
    # The next round composes with this one.
    _, info2 = dp.privatize(updates, prior_rounds=[{"dp": info}])
    assert info2["epsilon"] == pytest.approx(rdp_epsilon([(2.0, 1.0, 2)], 1e-5)) and info2["epsilon"] > info["epsilon"]


def test_central_dp_federation_records_epsilon_per_round_and_on_the_card(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    lora = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    init = init_adapter(tiny_model_dir, lora)
    cfg = config(tmp_path, tiny_model_dir, rounds=2, min_sites=2,
                 lora={"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
                 privacy={"mode": "central", "noise_multiplier": 1.5, "clip_norm": 0.1, "delta": 1e-6})
    deltas = {r: {"site-a": small_delta(init, 10 + r), "site-b": small_delta(init, 20 + r)} for r in (1, 2)}

    # Execute
    store = run_federation(cfg, init, deltas)

    # Assert: each round's info holds the cumulative central epsilon, and the card states the final one
    eps = [r.info["dp"]["epsilon"] for r in store.rounds()]
    assert eps == pytest.approx([rdp_epsilon([(1.5, 1.0, n)], 1e-6) for n in (1, 2)])
    assert all(r.info["dp"]["noise_std"] == pytest.approx(1.5 * 0.1 / 2) for r in store.rounds())
    [pub] = store.publications()
    meta, body = parse_model_card((Path(pub["path"]) / "README.md").read_text())
    central = meta["fedbridge"]["dp"]["central"]
    assert central["epsilon"] == pytest.approx(eps[-1]) and central["delta"] == 1e-6 and central["rounds"] == 2
    assert meta["fedbridge"]["dp"]["mode"] == "central"
    assert f"ε = {eps[-1]:.4g} at δ = 1e-06" in body and "site-level" in body
