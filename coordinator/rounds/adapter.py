"""The federation's adapter: the initial LoRA state, its spec, and a PEFT model built from a state."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.config import LoraSpec
from fedcommon import tensors
from fedcommon.models import load_base, lora_config, lora_config_for
from protos.fedbridge.v1 import federation_service_pb2 as pb


@dataclass(frozen=True)
class AdapterInit:
    """Round 1's global adapter and the spec every update must follow."""

    state: dict[str, torch.Tensor]
    spec: pb.AdapterSpec


def init_adapter(base_model: Path, lora: LoraSpec) -> AdapterInit:
    """Draw the initial adapter with PEFT's own initialisation (A from ``lora.seed``, B = 0).

    ``all-linear`` and other shorthands are resolved by PEFT against the base model, so the spec lists the concrete
    module names.
    """
    from peft import get_peft_model, get_peft_model_state_dict

    base = load_base(base_model)
    targets: list[str] | str = "all-linear" if list(lora.target_modules) == ["all-linear"] else list(lora.target_modules)
    torch.manual_seed(lora.seed)
    model = get_peft_model(base, lora_config_for(lora.rank, lora.alpha, lora.dropout, targets))
    state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    state = {k: v.to(getattr(torch, lora.wire_dtype)) for k, v in state.items()}  # the spec (and wire) dtype
    resolved = sorted(model.peft_config["default"].target_modules)
    spec = tensors.make_adapter_spec(state, lora.rank, lora.alpha, lora.dropout, resolved)
    return AdapterInit(state, spec)


def peft_model_with(base_model: Path, spec: pb.AdapterSpec, state: dict[str, torch.Tensor], base_model_ref: str = ""):
    """A PeftModel on a freshly loaded base with ``state`` loaded as its adapter."""
    from peft import get_peft_model, set_peft_model_state_dict

    model = get_peft_model(load_base(base_model, cuda=False), lora_config(spec))
    if base_model_ref:  # adapter_config.json names where the base comes from, not this machine's path
        model.peft_config["default"].base_model_name_or_path = base_model_ref
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter state has keys the model does not: {unexpected[:3]}")
    return model
