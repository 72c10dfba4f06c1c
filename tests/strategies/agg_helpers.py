"""Builders shared by the strategy tests: tiny PEFT-shaped adapters and updates, all seeded."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from strategies.types import ClientUpdate, StateDict

PREFIX = "base_model.model.model.layers"
MODULES = ("self_attn.q_proj", "self_attn.v_proj")


def lora_keys(layer: int, module: str) -> tuple[str, str]:
    """(A key, B key) of one module, as PEFT saves them."""
    base = f"{PREFIX}.{layer}.{module}"
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight"


def base_name(layer: int, module: str) -> str:
    """The base weight name the residuals are keyed by."""
    return f"model.layers.{layer}.{module}.weight"


def adapter(seed: int, rank: int = 2, dims: tuple[int, int] = (5, 4), layers: int = 1,
            dtype: torch.dtype = torch.float64, extra: bool = False, scale: float = 1.0) -> StateDict:
    """A random adapter: per layer and module A [rank, in] and B [out, rank]; ``extra`` adds a bias-like key."""
    g = torch.Generator().manual_seed(seed)
    out_dim, in_dim = dims
    state: StateDict = {}
    for layer in range(layers):
        for m in MODULES:
            a, b = lora_keys(layer, m)
            state[a] = (scale * torch.randn(rank, in_dim, generator=g, dtype=torch.float64)).to(dtype)
            state[b] = (scale * torch.randn(out_dim, rank, generator=g, dtype=torch.float64)).to(dtype)
    if extra:
        state["base_model.model.score.modules_to_save.default.weight"] = (
            scale * torch.randn(3, generator=g, dtype=torch.float64)).to(dtype)
    return state


def fedsb_adapter(seed: int, rank: int = 2, layers: int = 1, dtype: torch.dtype = torch.float64,
                  scale: float = 1.0) -> StateDict:
    """A random Fed-SB adapter: per layer and module one R [rank, rank] (``<module>.lora_R.weight``)."""
    g = torch.Generator().manual_seed(seed)
    return {f"{PREFIX}.{layer}.{m}.lora_R.weight": (scale * torch.randn(rank, rank, generator=g,
                                                                        dtype=torch.float64)).to(dtype)
            for layer in range(layers) for m in MODULES}


def flat_state(seed: int, shapes: dict[str, tuple[int, ...]], scale: float = 1.0,
               dtype: torch.dtype = torch.float64) -> StateDict:
    """A random state with the given keys and shapes."""
    g = torch.Generator().manual_seed(seed)
    return {k: (scale * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype) for k, s in shapes.items()}


def updates_from(deltas: Sequence[StateDict], weights: Sequence[int] | None = None) -> list[ClientUpdate]:
    """ClientUpdates named site0, site1, ... with the given example counts (default 1, 2, 3, ...)."""
    ws = list(weights) if weights is not None else [i + 1 for i in range(len(deltas))]
    return [ClientUpdate(site=f"site{i}", delta=d, num_examples=w)
            for i, (d, w) in enumerate(zip(deltas, ws, strict=True))]


def clone(state: StateDict) -> StateDict:
    """Deep copy of a state."""
    return {k: v.clone() for k, v in state.items()}


def assert_state_close(got: StateDict, want: StateDict, atol: float = 1e-6, rtol: float = 0.0) -> None:
    """Same keys, shapes and values within tolerance."""
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k].to(torch.float64), want[k].to(torch.float64), atol=atol, rtol=rtol,
                                   msg=lambda m, k=k: f"{k}: {m}")
