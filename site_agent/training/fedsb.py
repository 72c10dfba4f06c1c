"""Fed-SB on the site: a stock PEFT LoRA model whose B and A are fixed and whose only trainable tensor is R.

PEFT's LoRA forward is ``lora_B(lora_A(x)) · scaling``. Here ``lora_A.weight`` is set to the fixed A and frozen,
and ``lora_B.weight`` is reparametrised as ``B_fixed @ R`` (``torch.nn.utils.parametrize``), so the only parameter
left to train is R ``[r, r]`` (:mod:`strategies.fedsb`). B and A come from :func:`strategies.fedsb.fixed_factors`,
which the coordinator computes alike to publish ``B R`` and ``A``; they never travel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from strategies import fedsb


def is_fedsb_spec(spec: Any) -> bool:
    """True when an adapter spec describes a Fed-SB adapter (only ``lora_R`` tensors)."""
    return fedsb.is_fedsb_state(t.name for t in spec.tensors)


class _TimesR(torch.nn.Module):
    """``weight = B @ R`` with B a fixed buffer; ``right_inverse`` maps a weight back to R (B has orthonormal columns)."""

    def __init__(self, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("b", b)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.b.to(r.dtype) @ r

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return self.b.T.to(weight.dtype) @ weight


def install(model: Any) -> dict[str, torch.nn.Parameter]:
    """Fix A and B in every LoRA layer of ``model`` (adapter ``default``) and return R by adapter key.

    Returns:
        ``<module>.lora_R.weight`` -> the R parameter (the only tensors to train and to send).
    """
    from peft.tuners.lora import LoraLayer
    from torch.nn.utils import parametrize

    found: dict[str, torch.nn.Parameter] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        lin_a, lin_b = module.lora_A["default"], module.lora_B["default"]
        r, in_f = lin_a.weight.shape
        out_f = lin_b.weight.shape[0]
        b, a = fedsb.fixed_factors(name, int(out_f), int(in_f), int(r))
        with torch.no_grad():
            lin_a.weight.copy_(a.to(lin_a.weight.dtype))
            lin_b.weight.zero_()  # R starts at 0 (right_inverse of a zero weight)
        lin_a.weight.requires_grad_(False)
        parametrize.register_parametrization(lin_b, "weight", _TimesR(b.to(lin_b.weight.device)))
        found[fedsb.r_key(name)] = lin_b.parametrizations.weight.original
    if not found:
        raise ValueError("Fed-SB: the model has no LoRA layers to fix B and A in")
    return found


def load(params: Mapping[str, torch.nn.Parameter], state: Mapping[str, torch.Tensor]) -> None:
    """Copy the global R matrices into the model (keys already checked against the spec)."""
    missing = sorted(params.keys() ^ state.keys())[:3]
    if missing:
        raise ValueError(f"Fed-SB adapter does not match the model's adapted modules (for example {missing})")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(p.dtype))


def set_trainable(model: Any, params: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """Only R trains: every other LoRA tensor (fixed A, and B's original weight) is frozen."""
    ids = {id(p) for p in params.values()}
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad = id(p) in ids
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def state(params: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The R matrices on the CPU, keyed like the adapter."""
    return {k: p.detach().to("cpu", copy=True) for k, p in sorted(params.items())}
