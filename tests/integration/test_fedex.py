"""FedEx-LoRA end to end: the residual reaches the sites, the error meter is ~0, the published model carries it."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from coordinator.rounds.store import Store
from fedcommon import tensors
from sandbox import localfed


def test_fedex_lora_round_trip(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    fed = localfed.prepare(tmp_path, tiny_model_dir, n_sites=2, rounds=2, strategy="fedex_lora",
                           training={"max_steps": 6, "batch_size": 4},
                           lora={"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
                           n_train=16, n_heldout=4)
    # Execute
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            fed.start_site(s)
        codes = fed.wait([s.name for s in fed.sites] + ["coordinator"], timeout=400)
    # Assert
    assert set(codes.values()) == {0}, (codes, localfed._tail(fed.log_path("coordinator")))
    store = Store(fed.state_dir)
    rounds = store.rounds()
    assert [r.state for r in rounds] == ["closed", "closed"]
    for r in rounds:  # exact: the published product plus the folded residual equals mean(B_i A_i)
        assert r.info["strategy"] == "fedex_lora"
        assert r.info["aggregation_error"]["max"] < 1e-5
    # Round 2's sites trained on base + round 1's residual, which the task pinned by hash.
    r2 = tensors.decode_state(store.residual_path(2).read_bytes())
    final = tensors.decode_state(store.residual_path(3).read_bytes())
    assert set(final) == set(r2) and any(float(v.abs().max()) > 0 for v in final.values())
    site_log = fed.log_path("site-a").read_text()
    assert "refus" not in site_log.lower()
    # The published merged model = base + cumulative residual + scaled B @ A.
    pub = Path(store.publications()[0]["path"])
    merged = {}
    for shard in sorted((pub / "merged").glob("*.safetensors")):
        merged.update(load_file(shard))
    base = load_file(tiny_model_dir / "model.safetensors")
    adapter = tensors.decode_state(store.adapter_path(3).read_bytes())
    name = "model.layers.1.self_attn.q_proj.weight"
    a = adapter["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    want = base[name] + final[name] + (8.0 / 4) * (b @ a)
    assert torch.allclose(merged[name], want, atol=1e-5)
    assert (pub / "adapter" / "base_residual.safetensors").exists() or (pub / "base_residual.safetensors").exists()
