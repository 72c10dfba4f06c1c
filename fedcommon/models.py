"""The base model and the LoRA config, built the same way on both sides.

The coordinator builds PEFT models to draw the initial adapter, merge, evaluate and publish; a site builds one to
train. Both must give PEFT the same ``LoraConfig`` for a spec, or the adapter's keys and scaling would differ
between the model that trained an update and the one that aggregates or publishes it.

transformers, peft and bitsandbytes are imported inside the functions: importing :mod:`fedcommon` must stay cheap
and must not need the training stack.
"""

from __future__ import annotations

import json
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


def model_skeleton(base_model: Path) -> Any:
    """The base's module tree on the ``meta`` device, built from its ``config.json`` (no weight is read).

    Raises:
        ValueError: ``config.json`` is missing or transformers cannot build a causal LM from it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (Path(base_model) / "config.json").is_file():
        raise ValueError(f"{base_model} has no config.json: its modules are read from the config")
    try:
        cfg = AutoConfig.from_pretrained(base_model)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{base_model}/config.json does not describe a causal LM transformers can build: {e}") from e


def linear_module_names(base_model: Path) -> tuple[list[str], str]:
    """The full names of the base's leaf Linear / transformers ``Conv1D`` modules, and its output layer's name.

    The model is built on the meta device from ``config.json`` alone: no weight is read, so this costs milliseconds
    even for a 70B base.
    """
    from transformers.pytorch_utils import Conv1D

    model = model_skeleton(base_model)
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


PRECISIONS = ("bf16", "fp16", "fp32")
_HALF = (torch.bfloat16, torch.float16)
_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "half": torch.float16, "float64": torch.float64}


def training_precision(cuda: bool, bf16_supported: bool) -> str:
    """The mixed-precision mode a site trains in: ``bf16`` or ``fp16`` autocast on CUDA, ``fp32`` on CPU.

    bf16 where the GPU has it (Ampere and later): it has fp32's range, so no loss scaling is needed. fp16 with loss
    scaling on older GPUs. On CPU, fp32: these CPUs lack bf16 instructions and bf16 matmuls run about 13x slower.
    """
    if not cuda:
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def device_precision() -> tuple[bool, bool]:
    """``(cuda, bf16_supported)`` of this machine (the inputs of :func:`training_precision`)."""
    cuda = torch.cuda.is_available()
    return cuda, bool(cuda and torch.cuda.is_bf16_supported())


def trainer_precision_args(cuda: bool, bf16_supported: bool) -> dict[str, bool]:
    """The ``TrainingArguments`` precision flags (``use_cpu``, ``bf16``, ``fp16``) for this device.

    TRL 1.16 configs default to ``bf16=True``, which fails (or crawls) on CPU, so every flag is always given.
    """
    precision = training_precision(cuda, bf16_supported)
    return {"use_cpu": not cuda, "bf16": precision == "bf16", "fp16": precision == "fp16"}


def stored_dtype(base_model: Path) -> torch.dtype | None:
    """The dtype the base's weights are stored in, from ``config.json`` (``dtype``, or the older ``torch_dtype``).

    None when the config names none (or names one this project does not know); the caller then loads float32.
    """
    try:
        config = json.loads((Path(base_model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return _DTYPE_NAMES.get(str(name).removeprefix("torch.")) if name else None


def load_dtype(stored: torch.dtype | None, cuda: bool, bf16_supported: bool) -> torch.dtype:
    """The dtype the base is loaded in for training.

    On CUDA the stored dtype is kept (a bf16 base stays bf16: half the memory, and autocast computes in bf16
    anyway); a bf16 base on a GPU without bf16 is loaded in fp16, the precision its autocast computes in. On CPU a
    half-precision base is upcast to float32: it is the site's own RAM, and CPU matmuls in bf16 run about 13x
    slower without bf16 instructions (fp16 ones are slower still), so fp32 is both the fast and the exact choice.
    """
    if stored is None:
        return torch.float32
    if not cuda:
        return torch.float32 if stored in _HALF else stored
    if stored == torch.bfloat16 and not bf16_supported:
        return torch.float16
    return stored


def load_plan(stored: torch.dtype | None, quantize: bool, cuda: bool, bf16_supported: bool,
              device_map: str = "") -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments of :func:`load_base` (a pure function of the device).

    Returns:
        ``dtype`` and, where it applies, ``device_map``; with ``quantize`` also ``compute_dtype`` (for
        ``BitsAndBytesConfig``, not ``from_pretrained``).
    """
    plan: dict[str, Any] = {}
    if quantize:
        # bf16 compute on CUDA, as in the QLoRA paper (fp16 on a GPU without bf16); fp32 on CPU, where bf16
        # matmuls run about 13x slower without bf16 instructions. The LoRA weights, and so the delta, stay float32.
        precision = training_precision(cuda, bf16_supported)
        plan["compute_dtype"] = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        plan["dtype"] = torch.float32  # the modules left unquantized (norms, head) train and stay in float32
        plan["device_map"] = (device_map or "auto") if cuda else "cpu"
        return plan
    plan["dtype"] = load_dtype(stored, cuda, bf16_supported)
    if cuda and device_map:  # spread a base larger than one GPU over the visible GPUs (single-process sites)
        plan["device_map"] = device_map
    return plan


def load_base(base_model: Path, quantize: bool = False, device_map: str = "", cuda: bool | None = None) -> Any:
    """Load the base model for training or merging: in its stored dtype where the device computes in it, or in
    4-bit nf4 with double quantization (QLoRA; bf16 compute on CUDA). See :func:`load_plan`.

    Args:
        base_model: A local model directory (already verified against its manifest).
        quantize: Load it for QLoRA (Dettmers et al., 2023): 4-bit nf4 weights, placed by ``device_map``.
        device_map: On CUDA, a transformers ``device_map`` (``"auto"`` spreads the base over the GPUs); empty:
            one device. Ignored on CPU.
        cuda: Whether the model will run on CUDA (None: whether CUDA is available). The coordinator passes
            False: it only ever uses the base on CPU.

    Raises:
        ImportError: ``quantize`` without bitsandbytes installed (the ``site`` extra).
    """
    from transformers import AutoModelForCausalLM

    if cuda is None:
        cuda, bf16 = device_precision()
    else:
        bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    plan = load_plan(stored_dtype(base_model), quantize, cuda, bf16, device_map)
    if not quantize:
        return AutoModelForCausalLM.from_pretrained(base_model, **plan)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError("mode 'qlora' needs bitsandbytes: install the 'site' extra (pip install "
                          "'fedbridge[site]')") from e
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=plan.pop("compute_dtype"), bnb_4bit_quant_storage=torch.uint8)
    return AutoModelForCausalLM.from_pretrained(base_model, quantization_config=quant, **plan)
