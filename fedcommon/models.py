"""The base model and the LoRA config, built the same way on both sides.

The coordinator builds PEFT models to draw the initial adapter, merge, evaluate and publish; a site builds one to
train. Both must give PEFT the same ``LoraConfig`` for a spec, or the adapter's keys and scaling would differ
between the model that trained an update and the one that aggregates or publishes it.

transformers, peft and bitsandbytes are imported inside the functions: importing :mod:`fedcommon` must stay cheap
and must not need the training stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from protos.fedbridge.v1 import federation_service_pb2 as pb


def lora_config_for(rank: int, alpha: float, dropout: float, target_modules: list[str] | str) -> Any:
    """A causal-LM ``peft.LoraConfig`` with these hyper-parameters.

    Args:
        rank: LoRA rank r.
        alpha: LoRA alpha (the update is scaled by alpha / r).
        dropout: LoRA dropout.
        target_modules: Module names, or a PEFT shorthand such as ``"all-linear"`` (resolved against the model).
    """
    from peft import LoraConfig

    # PEFT annotates lora_alpha as int, but only ever computes alpha / r with it: a spec's float alpha is kept as is.
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,  # type: ignore[arg-type]
                      target_modules=target_modules, task_type="CAUSAL_LM")


def lora_config(spec: pb.AdapterSpec) -> Any:
    """The ``peft.LoraConfig`` of a federation's adapter spec (its target modules are already concrete names)."""
    return lora_config_for(spec.rank, spec.alpha, spec.dropout, list(spec.target_modules))


def load_base(base_model: Path, quantize: bool = False) -> Any:
    """Load the base model in float32, or in 4-bit nf4 with double quantization (QLoRA; bf16 compute on CUDA).

    Args:
        base_model: A local model directory (already verified against its manifest).
        quantize: Load it for QLoRA (Dettmers et al., 2023): 4-bit nf4 weights, placed by ``device_map``.

    Raises:
        ImportError: ``quantize`` without bitsandbytes installed (the ``site`` extra).
    """
    from transformers import AutoModelForCausalLM

    if not quantize:
        return AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("mode 'qlora' needs bitsandbytes: install the 'site' extra (pip install "
                          "'fedbridge[site]')") from e
    from transformers import BitsAndBytesConfig

    # bf16 compute on CUDA, as in the QLoRA paper; fp32 on CPU, where bf16 matmuls run about 13x slower without bf16
    # instructions. The LoRA weights, and so the delta, stay float32 either way.
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)
    device_map = "auto" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(base_model, quantization_config=quant, device_map=device_map,
                                                dtype=torch.float32)
