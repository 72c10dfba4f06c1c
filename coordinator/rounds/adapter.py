"""The federation's adapter: the initial LoRA state, its spec, and a PEFT model built from a state.

The coordinator never loads the base model's weights: the initial adapter is drawn from shapes. The model is built
on PyTorch's ``meta`` device from ``config.json`` alone (no tensor storage at all), PEFT resolves the target modules
on that skeleton, and only the LoRA tensors are materialised on the CPU. Memory is O(adapter), whatever the base's
size, and a 7B base costs the coordinator its config file, not 30 GB of float32 weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.config import LoraSpec
from fedcommon import tensors
from fedcommon.models import load_base, lora_config, lora_config_for, model_skeleton
from protos.fedbridge.v1 import federation_service_pb2 as pb

ADAPTER_DTYPE = torch.float32  # drawn in float32 (as sites train), then cast to [lora] wire_dtype


@dataclass(frozen=True)
class AdapterInit:
    """Round 1's global adapter and the spec every update must follow."""

    state: dict[str, torch.Tensor]
    spec: pb.AdapterSpec


def fan_in_fan_out_weights(model: Any) -> frozenset[str]:
    """Names of the weights stored ``[in, out]`` (``transformers.pytorch_utils.Conv1D``, as in GPT-2).

    A dense ``B @ A`` (``[out, in]``) must be transposed before it is added to such a weight; PEFT calls these
    layers ``fan_in_fan_out``.
    """
    from transformers.pytorch_utils import Conv1D

    return frozenset(f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Conv1D))


def init_adapter(base_model: Path, lora: LoraSpec, fed_sb: bool = False) -> AdapterInit:
    """Draw the initial adapter from the base's shapes, with PEFT's own initialisation (A from ``lora.seed``, B = 0).

    ``all-linear`` and other shorthands are resolved by PEFT against the base's module tree (built on the meta
    device), so the spec lists the concrete module names. No base weight is read.

    Initialisation is PEFT's ``init_lora_weights=True`` (``LoraLayer.reset_lora_parameters``): each
    ``lora_A.weight`` gets ``kaiming_uniform_(a=sqrt(5))``, each ``lora_B.weight`` zeros. RNG order, which makes the
    draw a function of the seed alone: one ``torch.Generator`` seeded with ``lora.seed`` (the global RNG is not
    touched), and the A matrices drawn one after another in the order of PEFT's adapter state dict, which is the
    order of the model's modules.

    With ``fed_sb`` (strategy ``fed-sb``) the adapter is one zero ``lora_R`` matrix ``[r, r]`` per module instead
    (:mod:`strategies.fedsb`: B and A are fixed and never travel).
    """
    from peft import get_peft_model, get_peft_model_state_dict

    from strategies import fedsb

    skeleton = model_skeleton(base_model)
    targets: list[str] | str = "all-linear" if list(lora.target_modules) == ["all-linear"] else list(lora.target_modules)
    model = get_peft_model(skeleton, lora_config_for(lora.rank, lora.alpha, lora.dropout, targets))
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    resolved = sorted(model.peft_config["default"].target_modules)
    del model, skeleton
    if fed_sb:
        state = {k: v.to(getattr(torch, lora.wire_dtype)) for k, v in fedsb.zero_state(shapes).items()}
        return AdapterInit(state, tensors.make_adapter_spec(state, lora.rank, lora.alpha, lora.dropout, resolved))
    gen = torch.Generator().manual_seed(lora.seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        t = torch.zeros(shape, dtype=ADAPTER_DTYPE)
        if key.endswith(".lora_A.weight"):
            torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
        elif not key.endswith(".lora_B.weight"):
            raise ValueError(f"the adapter would hold {key!r}, which is not a LoRA A/B weight")
        state[key] = t
    state = {k: v.to(getattr(torch, lora.wire_dtype)) for k, v in state.items()}  # the spec (and wire) dtype
    spec = tensors.make_adapter_spec(state, lora.rank, lora.alpha, lora.dropout, resolved, wire_compression(lora))
    return AdapterInit(state, spec)


def fedsb_module_shapes(base_model: Path, spec: pb.AdapterSpec) -> dict[str, tuple[int, int]]:
    """PEFT module path -> ``(out_features, in_features)`` of every module the spec adapts (from the meta skeleton)."""
    from peft import get_peft_model, get_peft_model_state_dict

    model = get_peft_model(model_skeleton(base_model), lora_config(spec))
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    out: dict[str, tuple[int, int]] = {}
    for key, shape in shapes.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[module] = (int(shapes[module + ".lora_B.weight"][0]), int(shape[1]))
    return out


def peft_view(base_model: Path, spec: pb.AdapterSpec, state: dict[str, torch.Tensor]
              ) -> tuple[pb.AdapterSpec, dict[str, torch.Tensor]]:
    """The adapter as stock PEFT LoRA: unchanged, except a Fed-SB adapter (``lora_R`` matrices), which becomes
    ``lora_A = A, lora_B = B R`` (:func:`strategies.fedsb.expand`; same rank and alpha) for evaluation, merge and
    publication."""
    from strategies import fedsb

    if not fedsb.is_fedsb_state(state):
        return spec, state
    dtype = next(iter(state.values())).dtype
    full = fedsb.expand(state, fedsb_module_shapes(base_model, spec), dtype=dtype)
    return tensors.make_adapter_spec(full, spec.rank, spec.alpha, spec.dropout, list(spec.target_modules)), full


def wire_compression(lora: LoraSpec) -> pb.Compression | None:
    """The update encoding of ``[lora] compression`` for the adapter spec (None: dense)."""
    if lora.compression == "none":
        return None
    return pb.Compression(encoding=lora.compression, block_size=lora.compression_block_size,
                          topk_fraction=lora.topk_fraction)


def peft_model_with(base_model: Path, spec: pb.AdapterSpec, state: dict[str, torch.Tensor], base_model_ref: str = ""):
    """A PeftModel on a freshly loaded base with ``state`` loaded as its adapter.

    This loads the whole base: the coordinator itself uses it only as the last-resort merge of a checkpoint whose
    tensor names do not follow its modules (tests use it as the reference).
    """
    from peft import get_peft_model, set_peft_model_state_dict

    model = get_peft_model(load_base(base_model, cuda=False), lora_config(spec))
    if base_model_ref:  # adapter_config.json names where the base comes from, not this machine's path
        model.peft_config["default"].base_model_name_or_path = base_model_ref
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter state has keys the model does not: {unexpected[:3]}")
    return model


@dataclass(frozen=True)
class BaseLayout:
    """How the base stores the weights a merge or a residual touches (read from the module tree, no weight read).

    Attributes:
        fan_in_fan_out: Weights stored ``[in, out]`` (:func:`fan_in_fan_out_weights`).
        tied: ``output weight name -> input embedding weight name`` when ``tie_word_embeddings`` shares them (the
            checkpoint then holds only the input embedding).
        base_prefix: The model's ``base_model_prefix`` and a dot (``"transformer."`` for GPT-2), which some
            checkpoints leave out of their tensor names.
    """

    fan_in_fan_out: frozenset[str] = frozenset()
    tied: tuple[tuple[str, str], ...] = ()
    base_prefix: str = ""


def base_layout(base_model: Path) -> BaseLayout:
    """The :class:`BaseLayout` of the base in ``base_model`` (the empty layout when it has no ``config.json``)."""
    if not (Path(base_model) / "config.json").is_file():
        return BaseLayout()
    model = model_skeleton(base_model)
    tied: tuple[tuple[str, str], ...] = ()
    if getattr(model.config, "tie_word_embeddings", False):
        names = {id(m): n for n, m in model.named_modules()}
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and inp is not None and id(out) in names and id(inp) in names:
            tied = ((f"{names[id(out)]}.weight", f"{names[id(inp)]}.weight"),)
    prefix = getattr(model, "base_model_prefix", "") or ""
    return BaseLayout(fan_in_fan_out_weights(model), tied, f"{prefix}." if prefix else "")


def scaled_residual_in_weight_layout(residual: dict[str, torch.Tensor], scale: float,
                                     fan_in_fan_out: frozenset[str]) -> dict[str, torch.Tensor]:
    """A rule's dense residuals (``[out, in]``, unscaled) as additions to the base weights: ``scale * residual`` in
    float64, stored float32, transposed to ``[in, out]`` for a Conv1D weight.

    Everything downstream (the residual the sites fold into their base, the merge, the published
    ``base_residual.safetensors``) then adds it to the weight exactly as the checkpoint stores it; square Conv1D
    weights (GPT-2's ``c_proj``) would otherwise take the wrong orientation without any shape error.
    """
    out = {}
    for name, r in residual.items():
        add = (scale * r.to(torch.float64)).to(torch.float32)
        out[name] = (add.T if name in fan_in_fan_out else add).contiguous()
    return out


def add_residual(total: dict[str, torch.Tensor], residual: dict[str, torch.Tensor], scale: float,
                 fan_in_fan_out: frozenset[str]) -> dict[str, torch.Tensor]:
    """FedEx-LoRA's cumulative base residual after one more round: ``total`` plus this round's rule residual
    (``[out, in]``, unscaled) scaled by ``scale`` (alpha/r) in each weight's own layout
    (:func:`scaled_residual_in_weight_layout`). ``total`` is not changed; the new cumulative residual is returned."""
    out = dict(total)
    for name, add in scaled_residual_in_weight_layout(residual, scale, fan_in_fan_out).items():
        out[name] = out[name] + add if name in out else add
    return out
