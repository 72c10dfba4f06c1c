"""FedAvg's blocked, site-ordered summation: the same bits in any arrival order, from tensors or mapped files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coordinator.rounds.mapped import map_state
from strategies import fedavg
from strategies.types import ClientUpdate


def _updates(n: int, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    g = torch.Generator().manual_seed(7)
    # One key larger than a block, so block boundaries are exercised; one tiny key.
    shapes = {"m.lora_A.weight": (3, fedavg.BLOCK // 2 + 5), "m.lora_B.weight": (fedavg.BLOCK // 2 + 5, 3), "b": (4,)}
    glob = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    ups = [ClientUpdate(f"site-{i}", {k: (torch.randn(s, generator=g) * 1e-2).to(dtype) for k, s in shapes.items()},
                        num_examples=1 + 37 * i % 101) for i in range(n)]
    return glob, ups


def test_any_arrival_order_gives_the_same_bits() -> None:
    glob, ups = _updates(9)
    a = fedavg.aggregate(glob, ups)
    b = fedavg.aggregate(glob, list(reversed(ups)))
    c = fedavg.aggregate(glob, [ups[i] for i in (4, 0, 8, 2, 6, 1, 7, 3, 5)])
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])


def test_float32_sums_match_a_float64_reference_closely() -> None:
    glob, ups = _updates(50)
    got = fedavg.aggregate(glob, ups)
    total = sum(u.num_examples for u in ups)
    for k, g in glob.items():
        want = g.double() + sum(u.num_examples * u.delta[k].double() for u in ups) / total
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), want, atol=1e-6, rtol=1e-6)


def test_blocked_sums_equal_one_update_at_a_time_in_site_order() -> None:
    glob, ups = _updates(5)
    acc = fedavg.FedAvgAccumulator(glob)
    for u in sorted(ups, key=lambda u: u.site):
        acc.add(u)
    streamed = acc.apply_to(glob)
    blocked = fedavg.aggregate(glob, ups)
    for k in glob:
        assert torch.equal(streamed[k], blocked[k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_mapped_files_give_the_same_bits_as_tensors(tmp_path: Path, dtype: torch.dtype) -> None:
    glob, ups = _updates(4, dtype)
    mapped = []
    for u in ups:
        path = tmp_path / f"{u.site}.safetensors"
        save_file({k: v.contiguous() for k, v in u.delta.items()}, path)
        mapped.append(ClientUpdate(u.site, map_state(path), u.num_examples))
    a, b = fedavg.aggregate(glob, ups), fedavg.aggregate(glob, mapped)
    for k in a:
        assert a[k].dtype == dtype and torch.equal(a[k], b[k])
