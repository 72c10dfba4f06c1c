"""Fed-SB end to end: a real coordinator and 2 real site processes over mTLS, 2 rounds with local DP on. Sites send
only the r×r R matrices (a few hundred bytes per module, the same for every site), and the published adapter is a
stock PEFT LoRA (lora_A = the fixed A, lora_B = B R) whose merge is base + scale · B R A."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from coordinator.rounds.store import Store
from fedcommon import tensors
from sandbox import localfed
from strategies import fedsb

RANK, ALPHA = 4, 8.0


def test_fedsb_federation_sends_only_r_and_publishes_a_stock_peft_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    fed = localfed.prepare(tmp_path, tiny_model_dir, n_sites=2, rounds=2, strategy="fed-sb",
                           training={"max_steps": 4, "batch_size": 4, "learning_rate": 5e-2},
                           lora={"rank": RANK, "alpha": ALPHA, "target_modules": ["q_proj", "v_proj"]},
                           n_train=16, n_heldout=4, privacy={"mode": "local", "noise_multiplier": 0.5, "clip_norm": 1.0})
    # Execute
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            policy = fed.root / "sites" / s.name / "policy.toml"
            policy.parent.mkdir(parents=True, exist_ok=True)
            policy.write_text("min_dp_noise_multiplier = 0.5\ndp_epsilon_budget = 1000.0\ndp_delta = 1e-5\n")
            fed.start_site(s, extra={"policy": str(policy)})
        codes = fed.wait([s.name for s in fed.sites] + ["coordinator"], timeout=400)
    # Assert: both rounds closed with Fed-SB; every upload is the R matrices alone.
    assert set(codes.values()) == {0}, (codes, localfed._tail(fed.log_path("coordinator")),
                                        localfed._tail(fed.log_path("site-a")))
    store = Store(fed.state_dir)
    rounds = store.rounds()
    assert [r.state for r in rounds] == ["closed", "closed"]
    final = tensors.decode_state(store.adapter_path(3).read_bytes())
    assert fedsb.is_fedsb_state(final) and {tuple(v.shape) for v in final.values()} == {(RANK, RANK)}
    r_bytes = len(tensors.encode_state({k: v.float() for k, v in final.items()}))
    for r in rounds:
        assert r.info["strategy"] == "fed_sb"
        sizes = [u["bytes"] for u in r.info["updates"].values()]
        assert len(sizes) == 2 and all(size == r_bytes for size in sizes), (sizes, r_bytes)
    assert any(float(v.abs().max()) > 0 for v in final.values())
    # The published adapter is stock PEFT LoRA: A is the fixed factor, B is B_fixed @ R; merged = base + s · B R A.
    pub = Path(store.publications()[0]["path"])
    adapter = load_file(pub / "adapter" / "adapter_model.safetensors")
    config = json.loads((pub / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == RANK and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in adapter)
    module = "base_model.model.model.layers.1.self_attn.q_proj"
    r_final = final[fedsb.r_key(module)].double()
    a, b = adapter[module + ".lora_A.weight"].double(), adapter[module + ".lora_B.weight"].double()
    fixed_b, fixed_a = fedsb.fixed_factors(module, b.shape[0], a.shape[1], RANK)
    assert torch.equal(a, fixed_a.double())
    torch.testing.assert_close(b, fixed_b.double() @ r_final, atol=1e-6, rtol=0)
    merged = {}
    for shard in sorted((pub / "merged").glob("*.safetensors")):
        merged.update(load_file(shard))
    base = load_file(tiny_model_dir / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    want = base[name].double() + (ALPHA / RANK) * (fixed_b.double() @ r_final @ fixed_a.double())
    torch.testing.assert_close(merged[name].double(), want, atol=1e-5, rtol=0)
    assert "refus" not in fed.log_path("site-a").read_text().lower()
