"""FedAvg from stored files in one pass: the N updates and the global read once, the output written once.

``aggregate`` on flat-view updates computes ``global + lr * mean`` block by block (sums in a cache-sized scratch
block, never a whole-adapter buffer) and must give exactly the bits of the streaming path (one update at a time,
then ``apply_to``), for float32 and bfloat16 globals, on one thread and on two. The accumulator's sums start
uninitialised; the first update written over them must give the bits of ``0 + w * delta`` (a bfloat16 update
widened before it is scaled, not scaled in bfloat16).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coordinator.rounds.mapped import map_state
from strategies import fedavg
from strategies.registry import build_strategy
from strategies.types import ClientUpdate

# Sizes off every block and vector boundary, one tensor spanning several blocks.
SHAPES = {"a.lora_A.weight": (5, fedavg.BLOCK + 7), "a.lora_B.weight": (3 * fedavg.BLOCK // 2 + 3, 2), "z": (9,)}


def _inputs(tmp_path: Path, n: int, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[ClientUpdate],
                                                                 list[ClientUpdate]]:
    g = torch.Generator().manual_seed(11)
    glob = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    plain, mapped = [], []
    for i in range(n):
        delta = {k: (torch.randn(s, generator=g) * 1e-2).to(dtype) for k, s in SHAPES.items()}
        save_file(delta, tmp_path / f"u{i}.safetensors")
        plain.append(ClientUpdate(f"site-{i:02d}", delta, num_examples=7 + 13 * i))
        mapped.append(ClientUpdate(f"site-{i:02d}", map_state(tmp_path / f"u{i}.safetensors"), 7 + 13 * i))
    return glob, plain, mapped


def _streamed(glob: dict[str, torch.Tensor], ups: list[ClientUpdate], lr: float) -> dict[str, torch.Tensor]:
    """The reference: zero sums, each update added in site-name order, then ``global + sum * lr / W``."""
    sums = {k: torch.zeros(v.shape, dtype=fedavg.sum_dtype(v.dtype)) for k, v in glob.items()}
    total = 0.0
    for u in sorted(ups, key=lambda u: u.site):
        for k, v in u.delta.items():
            sums[k].add_(v, alpha=float(u.num_examples))
        total += float(u.num_examples)
    return {k: torch.add(g, sums[k], alpha=lr / total).to(g.dtype) for k, g in glob.items()}


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_one_pass_from_files_gives_the_streaming_bits(tmp_path: Path, dtype: torch.dtype, threads: int) -> None:
    glob, plain, mapped = _inputs(tmp_path, 5, dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        want = _streamed(glob, plain, 0.7)
        cfg = fedavg.FedAvgConfig(server_lr=0.7)
        fused = fedavg.aggregate(glob, list(reversed(mapped)), cfg)
        one_by_one = fedavg.aggregate(glob, iter(mapped), cfg)  # a generator: the streaming path
        registry = build_strategy("fedavg", {"server_lr": 0.7}).aggregate(glob, mapped).state
    finally:
        torch.set_num_threads(before)
    for got in (fused, one_by_one, registry):
        _same(got, want)


def test_the_one_pass_path_is_taken_and_allocates_no_sums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    glob, _, mapped = _inputs(tmp_path, 3, torch.float32)
    fused: list[int] = []
    real = fedavg.FedAvgAccumulator._fuse

    def spy(self: fedavg.FedAvgAccumulator, *a: object) -> object:
        out = real(self, *a)  # type: ignore[arg-type]
        fused.append(out is not None)
        return out

    monkeypatch.setattr(fedavg.FedAvgAccumulator, "_fuse", spy)
    blocks: list[int] = []
    real_blocks = fedavg._add_blocks

    def spy_blocks(acc: torch.Tensor, *a: object, **kw: object) -> None:
        blocks.append(acc.numel())
        real_blocks(acc, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(fedavg, "_add_blocks", spy_blocks)
    build_strategy("fedavg", {}).aggregate(glob, mapped)
    assert fused == [True]
    assert blocks == []  # the accumulator's whole-adapter sums were never walked: only the one scratch block
    # Plain tensors (no flat view) and a generator take the accumulator path.
    fused.clear()
    build_strategy("fedavg", {}).aggregate(glob, [ClientUpdate(u.site, dict(u.delta), u.num_examples) for u in mapped])
    assert fused == [False]


def test_a_fused_accumulator_hands_over_once_and_only_for_its_own_global(tmp_path: Path) -> None:
    glob, _, mapped = _inputs(tmp_path, 2, torch.float32)
    acc = fedavg.FedAvgAccumulator(glob)
    acc.add_many(mapped, fuse_with=(glob, 1.0))
    with pytest.raises(fedavg.AggregationError):
        acc.mean()  # the sums were never written
    with pytest.raises(fedavg.AggregationError):
        acc.apply_to(dict(glob), 1.0, release=True)  # another global than the one it was fused with
    out = acc.apply_to(glob, 1.0, release=True)
    assert out.keys() == glob.keys()
    with pytest.raises(fedavg.AggregationError):
        acc.apply_to(glob, 1.0, release=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_first_update_over_uninitialised_sums_gives_the_zero_start_bits(tmp_path: Path, dtype: torch.dtype) -> None:
    glob, plain, mapped = _inputs(tmp_path, 4, dtype)
    want = _streamed(glob, plain, 1.0)
    acc = fedavg.FedAvgAccumulator(glob)
    for u in plain:  # add(): one update at a time
        acc.add(u)
    _same(acc.apply_to(glob), want)
    acc2 = fedavg.FedAvgAccumulator(glob)
    acc2.add_many(mapped[:2])  # the flat accumulator path, fresh then not fresh
    acc2.add_many(mapped[2:])
    _same(acc2.apply_to(glob), want)
