"""bench/quality.py in a drastically reduced configuration: the output schema, finite numbers, exact rules exact.

The real bench (3 sites, 12 rounds x 10 steps, two seeds) runs with ``python -m bench.quality``; here 2 sites train 2 rounds of
2 steps in this process, which is enough to exercise every method, the FedEx-LoRA fold and the error meter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import quality, report

ROW_TYPES = {"case": str, "ours": float, "reference": float, "ratio": float, "unit": str, "goal": str,
             "meets_goal": (bool, type(None))}  # None: an informational row


@pytest.fixture(scope="module")
def reduced(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cfg = quality.QualityConfig(sites=2, rounds=2, steps=2, batch_size=4, n_train=8, n_heldout=4, workers=1)
    results = quality.measure(cfg, tmp_path_factory.mktemp("quality"), base_model=tiny_model_dir)
    return cfg, results


def test_writes_the_bench_schema_with_finite_numbers(reduced, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    cfg, results = reduced
    monkeypatch.setattr(report, "RESULTS", tmp_path)  # never overwrite the real bench/results/quality.json
    # Execute
    path = report.write_results("quality", quality.build_rows(results, cfg), quality.build_notes(results, cfg, 1.0))
    data = json.loads(path.read_text())
    # Assert
    assert path == tmp_path / "quality.json" and data["bench"] == "quality"
    assert len(data["rows"]) == 13  # 3 vs centralized, 2 vs centralized_seq, 2 vs naive, 2 x 3 error-meter rows
    for row in data["rows"]:
        assert set(row) == set(ROW_TYPES)
        for key, kind in ROW_TYPES.items():
            assert isinstance(row[key], kind), (key, row)
        assert math.isfinite(row["ours"]) and math.isfinite(row["reference"]) and math.isfinite(row["ratio"]), row
    assert all(isinstance(n, str) and n for n in data["notes"])


def test_every_method_learns_and_the_exact_rules_are_exact(reduced) -> None:  # type: ignore[no-untyped-def]
    cfg, results = reduced
    assert set(results) == {"centralized", "centralized_seq", "fedavg", "ffa_lora", "fedex_lora"}
    for m, r in results.items():
        assert all(math.isfinite(x) for x in r.curve) and r.final < r.curve[0], (m, r.curve)
        assert set(r.per_site) == {"site-a", "site-b"}
        assert r.examples == cfg.rounds * cfg.sites * cfg.steps * cfg.batch_size  # same examples for everyone
    # ... and the goal's reference takes each site's number of steps, with the sites' batches pooled into one.
    assert results["centralized"].examples == results["centralized_seq"].examples
    for m in quality.FEDERATED:
        assert len(results[m].errors) == cfg.rounds and results[m].modules > 0
    assert max(results["ffa_lora"].errors) <= quality.EXACT_GOAL
    assert max(results["fedex_lora"].errors) <= quality.EXACT_GOAL
    assert min(results["fedavg"].errors) > 1e-4  # naive FedAvg is measurably inexact even after 2 steps
    # Round 1 starts from the same adapter with the same seeds: FedEx's sites produce FedAvg's deltas, and only the
    # folded residual separates the two published models.
    assert results["fedex_lora"].curve[1] != results["fedavg"].curve[1]


def test_fold_residual_adds_the_scaled_residual_to_the_base_weight_only(tiny_model_dir: Path) -> None:
    # Prepare
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    base_q = model.get_base_model().get_submodule("model.layers.0.self_attn.q_proj.base_layer")
    assert isinstance(base_q, torch.nn.Linear)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    residual = torch.ones_like(base_q.weight)
    # Execute
    quality.fold_residual(model, {"model.layers.0.self_attn.q_proj.weight": residual}, scale=2.0)
    # Assert
    after = dict(model.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed == ["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert torch.allclose(after[changed[0]] - before[changed[0]], torch.full_like(residual, 2.0))
