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


class TargetModuleError(ValueError):
    """``[lora] target_modules`` names a module the base model does not have (the message lists those it has)."""


def linear_module_names(base_model: Path) -> tuple[list[str], str]:
    """The full names of the base's leaf Linear / transformers ``Conv1D`` modules, and its output layer's name.

    The model is built on the meta device from ``config.json`` alone: no weight is read, so this costs milliseconds
    even for a 70B base.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    cfg = AutoConfig.from_pretrained(base_model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and not list(m.children())]
    out = model.get_output_embeddings()
    head = next((n for n, m in model.named_modules() if m is out), "") if out is not None else ""
    return names, head


def check_target_modules(base_model: Path, target_modules: tuple[str, ...] | list[str]) -> list[str]:
    """Resolve ``target_modules`` against the base model without loading weights; return the module suffixes hit.

    ``all-linear`` means every leaf Linear/Conv1D module except the output layer (as PEFT resolves it). Any other
    name matches a module whose full name is the name or ends in ``.name`` (PEFT's rule).

    Raises:
        TargetModuleError: A name matches no linear module; the message lists the module names that exist.
    """
    names, head = linear_module_names(base_model)
    suffixes = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    if list(target_modules) == ["all-linear"]:
        hit = [s for s in suffixes if s != head.rsplit(".", 1)[-1] or not head]
        if not hit:
            raise TargetModuleError(f"field 'lora.target_modules': 'all-linear' matches no linear module of the base "
                                    f"model at {base_model}")
        return hit
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        arch = ",".join(_architectures(base_model)) or "unknown architecture"
        raise TargetModuleError(
            f"field 'lora.target_modules': {', '.join(repr(m) for m in missing)} "
            f"match{'es' if len(missing) == 1 else ''} no module of the base model at {base_model} ({arch}); its "
            f"linear modules are: {', '.join(suffixes)} (or use \"all-linear\")")
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names
                              if any(n == t or n.endswith("." + t) for t in target_modules)))


def _architectures(base_model: Path) -> list[str]:
    import json

    try:
        return [str(a) for a in json.loads((Path(base_model) / "config.json").read_text()).get("architectures", [])]
    except (OSError, ValueError, AttributeError):
        return []


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
