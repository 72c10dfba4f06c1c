"""Every rule gives the same bits from memory-mapped stored updates (how the coordinator reads them) as from dicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from agg_helpers import adapter, fedsb_adapter
from safetensors.torch import save_file
from test_agg_properties import PARAMS

from coordinator.rounds.mapped import map_state
from strategies.error_meter import aggregation_error_from_updates
from strategies.registry import build_strategy, list_strategies
from strategies.types import ClientUpdate


@pytest.mark.parametrize("name", list_strategies())
def test_mapped_updates_aggregate_like_in_memory_ones(name: str, tmp_path: Path) -> None:
    # Prepare: float32 adapters, as sites send them; each delta also stored as a safetensors file and mapped.
    g = adapter(3, rank=2, extra=True, dtype=torch.float32)
    deltas = [adapter(100 + i, rank=2, extra=True, dtype=torch.float32, scale=0.3) for i in range(4)]
    if name == "fed_sb":  # R matrices only
        g = fedsb_adapter(3, dtype=torch.float32)
        deltas = [fedsb_adapter(100 + i, dtype=torch.float32, scale=0.3) for i in range(4)]
    if name == "ffa_lora":
        deltas = [{k: torch.zeros_like(v) if ".lora_A." in k else v for k, v in d.items()} for d in deltas]
    in_memory, mapped = [], []
    for i, d in enumerate(deltas):
        path = tmp_path / f"u{i}.safetensors"
        save_file(d, path)
        meta = {"lora_rank": 2}
        in_memory.append(ClientUpdate(f"site-{i}", d, 5 + i, meta))
        mapped.append(ClientUpdate(f"site-{i}", map_state(path), 5 + i, meta))
    rule = build_strategy(name, PARAMS.get(name, {}))
    # Execute
    a, b = rule.aggregate(g, in_memory), rule.aggregate(g, mapped)
    # Assert
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k]), k
    for k in a.base_residual:
        assert torch.equal(a.base_residual[k], b.base_residual[k]), k
    ea = aggregation_error_from_updates(g, in_memory, a.state, a.base_residual)
    eb = aggregation_error_from_updates(g, mapped, b.state, b.base_residual)
    assert ea.keys() == eb.keys() and all(ea[k] == eb[k] or (ea[k] != ea[k] and eb[k] != eb[k]) for k in ea)
