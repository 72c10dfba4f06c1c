"""FedAvg over stored files laid out as safetensors writes them: one flat view per file, summed in large blocks.

The fast path must give the bits of the per-key path, be taken for the coordinator's files, and step aside for
anything else (mixed dtypes, other layouts, updates that are not files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coordinator.rounds.mapped import map_state
from strategies import fedavg
from strategies.types import ClientUpdate

SHAPES = {"m.lora_A.weight": (3, fedavg.BLOCK // 2 + 5), "m.lora_B.weight": (fedavg.BLOCK // 2 + 5, 3), "b": (4,)}


def _updates(n: int) -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    g = torch.Generator().manual_seed(3)
    glob = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    return glob, [ClientUpdate(f"site-{i}", {k: torch.randn(s, generator=g) * 1e-2 for k, s in SHAPES.items()},
                               num_examples=3 + 11 * i) for i in range(n)]


def _mapped(tmp_path: Path, ups: list[ClientUpdate]) -> list[ClientUpdate]:
    out = []
    for u in ups:
        save_file(dict(u.delta), tmp_path / f"{u.site}.safetensors")
        out.append(ClientUpdate(u.site, map_state(tmp_path / f"{u.site}.safetensors"), u.num_examples))
    return out


def test_a_written_file_is_one_flat_view_in_name_order(tmp_path: Path) -> None:
    _, ups = _updates(1)
    mapped = _mapped(tmp_path, ups)[0].delta
    flat, layout = mapped.flat_view()  # type: ignore[attr-defined]
    assert [k for k, _ in layout] == sorted(SHAPES) and dict(layout) == SHAPES
    assert torch.equal(flat, torch.cat([ups[0].delta[k].reshape(-1) for k in sorted(SHAPES)]))
    save_file({"a": torch.ones(3), "b": torch.ones(2, dtype=torch.float64)}, tmp_path / "mixed.safetensors")
    assert map_state(tmp_path / "mixed.safetensors").flat_view() is None  # two dtypes: no single flat view


def test_the_flat_path_is_taken_and_gives_the_per_key_bits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    glob, ups = _updates(5)
    mapped = _mapped(tmp_path, ups)
    per_key = fedavg.aggregate(glob, ups)  # plain tensors: the per-key path
    checks = []
    monkeypatch.setattr(fedavg.FedAvgAccumulator, "_check", lambda self, u: checks.append(u.site))
    flat = fedavg.aggregate(glob, list(reversed(mapped)))
    assert checks == []  # no per-key walk: the layout check covered keys and shapes
    for k in glob:
        assert torch.equal(flat[k], per_key[k]), k


def test_anything_else_takes_the_per_key_path_with_the_same_bits(tmp_path: Path) -> None:
    glob, ups = _updates(4)
    mapped = _mapped(tmp_path, ups)
    mixed = [mapped[0], ups[1], mapped[2], ups[3]]  # some updates are not files
    want = fedavg.aggregate(glob, ups)
    got = fedavg.aggregate(glob, mixed)
    for k in glob:
        assert torch.equal(got[k], want[k]), k
    # A file with one key fewer does not match the layout; the per-key check names what is wrong.
    save_file({k: v for k, v in ups[0].delta.items() if k != "b"}, tmp_path / "short.safetensors")
    short = ClientUpdate("site-x", map_state(tmp_path / "short.safetensors"), 1)
    with pytest.raises(fedavg.AggregationError):
        fedavg.aggregate(glob, [short, *mapped[1:]])
