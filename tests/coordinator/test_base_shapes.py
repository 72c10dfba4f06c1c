"""The coordinator never loads the base: the initial adapter is drawn from config.json alone, merging and publishing
stream tensor by tensor; Conv1D (GPT-2, ``[in, out]`` weights) and tied embeddings merge correctly.

The memory bound is proven by construction: ``AutoModelForCausalLM.from_pretrained`` is made to raise while the
coordinator code runs, and the initial adapter is drawn from a base directory that has no weights at all.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from coordinator.config import LoraSpec
from coordinator.release.merge import merge_to_dir
from coordinator.release.publish import publish
from coordinator.rounds.adapter import base_layout, init_adapter, scaled_residual_in_weight_layout
from sandbox.families import build_family_model
from strategies import fedex_lora
from strategies.types import ClientUpdate

LORA = LoraSpec(rank=2, alpha=4.0, target_modules=("all-linear",), seed=7)


@pytest.fixture()
def no_base_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load a whole model fails the test."""
    import transformers

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("the coordinator loaded a whole base model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def gpt2_dir() -> Path:
    return build_family_model("gpt2")


def _random_b(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.1 if ".lora_B." in k else v.clone()) for k, v in state.items()}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_initial_adapter_comes_from_config_alone(gpt2_dir: Path, tmp_path: Path, no_base_load: None) -> None:
    base = tmp_path / "no-weights"
    base.mkdir()
    shutil.copy2(gpt2_dir / "config.json", base / "config.json")  # no safetensors at all
    init = init_adapter(base, LORA)
    assert list(init.spec.target_modules) == sorted(init.spec.target_modules)
    assert "transformer.h.0.attn.c_attn" in init.spec.target_modules and "lm_head" not in init.spec.target_modules
    # RNG order as documented: one generator seeded with the seed, A drawn in state-dict order, B zeros.
    gen = torch.Generator().manual_seed(LORA.seed)
    for key, t in init.state.items():
        assert t.dtype == torch.float32
        if key.endswith(".lora_B.weight"):
            assert not t.any()
        else:
            want = torch.empty(t.shape)
            torch.nn.init.kaiming_uniform_(want, a=math.sqrt(5), generator=gen)
            assert torch.equal(t, want), key
    # A is [r, in], B is [out, r] also for Conv1D, whose weight is [in, out] = [64, 192].
    assert tuple(init.state["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape) == (2, 64)
    assert tuple(init.state["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape) == (192, 2)
    again = init_adapter(base, LORA)
    assert again.spec.sha256 == init.spec.sha256
    other = init_adapter(base, LoraSpec(rank=2, alpha=4.0, target_modules=("all-linear",), seed=8))
    assert other.spec.sha256 == init.spec.sha256  # same shapes...
    assert any(not torch.equal(init.state[k], other.state[k]) for k in init.state)  # ...other draw


def test_gpt2_publish_streams_and_loads_with_stock_libraries(gpt2_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    real_load = AutoModelForCausalLM.from_pretrained
    init = init_adapter(gpt2_dir, LoraSpec(rank=2, alpha=4.0, target_modules=("all-linear",)))
    state = _random_b(init.state, 1)
    with monkeypatch.context() as m:
        m.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: (_ for _ in ()).throw(
            AssertionError("the coordinator loaded a whole base model")))
        m.setattr("coordinator.release.publish.render_model_card", lambda _prov: "card\n")  # provenance is not tested here
        _, path, _ = publish(base_model=gpt2_dir, spec=init.spec, state=state, registry_dir=tmp_path / "reg",
                             federation_id="fed", provenance={})
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    merged = real_load(path / "merged")
    peft = PeftModel.from_pretrained(real_load(gpt2_dir), path / "adapter")
    assert peft.peft_config["default"].fan_in_fan_out
    assert torch.allclose(_logits(merged, ids), _logits(peft, ids), atol=1e-4)
    assert not torch.allclose(_logits(merged, ids), _logits(real_load(gpt2_dir), ids), atol=1e-3)  # B != 0 counts


def test_fedex_residual_on_square_conv1d_is_in_the_weights_layout(gpt2_dir: Path, tmp_path: Path) -> None:
    """GPT-2's c_proj is [64, 64]: a residual in the product's [out, in] layout would merge with no shape error."""
    from safetensors.torch import load_file

    init = init_adapter(gpt2_dir, LoraSpec(rank=2, alpha=4.0, target_modules=("c_proj",)))
    glob = init.state
    sites = [_random_b({k: v + 0.05 * torch.randn(v.shape) for k, v in glob.items()}, s) for s in (1, 2)]
    ups = [ClientUpdate(f"s{i}", {k: s[k] - glob[k] for k in glob}, 1) for i, s in enumerate(sites)]
    new, residual = fedex_lora.aggregate(glob, ups)
    layout = base_layout(gpt2_dir)
    name = "transformer.h.0.attn.c_proj.weight"
    assert name in layout.fan_in_fan_out and layout.tied == (("lm_head.weight", "transformer.wte.weight"),)
    folded = scaled_residual_in_weight_layout(residual, 2.0, layout.fan_in_fan_out)
    result = merge_to_dir(gpt2_dir, new, rank=2, alpha=4.0, out_dir=tmp_path / "m", residual=folded)
    assert name in result.merged_modules
    merged = load_file(tmp_path / "m" / result.shards[0])[name]
    w0 = load_file(gpt2_dir / "model.safetensors")[name]
    key = "base_model.model.transformer.h.0.attn.c_proj"
    exact = sum(s[f"{key}.lora_B.weight"] @ s[f"{key}.lora_A.weight"] for s in sites) / 2  # mean(B_i A_i), [out, in]
    assert torch.allclose(merged, w0 + 2.0 * exact.T, atol=1e-5)
    assert not torch.allclose(merged, w0 + 2.0 * exact, atol=1e-3)


def test_adapter_on_tied_lm_head_unties_it_in_the_merge(tmp_path: Path) -> None:
    """The checkpoint of a tied model holds only the embedding: the merged lm_head gets a tensor of its own and the
    input embedding keeps its values, as in the PEFT model."""
    import json

    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from fedcommon.models import lora_config_for

    base = build_family_model("llama3")
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"]
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora_config_for(2, 4.0, 0.0, ["lm_head", "q_proj"]))
    # PEFT's own state dict of a tied lm_head also carries the base layer's weight: the adapter is the LoRA part.
    state = _random_b({k: v.detach().clone() for k, v in get_peft_model_state_dict(peft).items() if ".lora_" in k}, 3)
    set_peft_model_state_dict(peft, state)
    merge_to_dir(base, state, rank=2, alpha=4.0, out_dir=tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.tensor([[1, 7, 30, 200, 9]])
    assert torch.allclose(_logits(merged, ids), _logits(peft, ids), atol=1e-4)
    original = AutoModelForCausalLM.from_pretrained(base)
    assert torch.equal(merged.get_input_embeddings().weight, original.get_input_embeddings().weight)


def test_hub_style_gpt2_checkpoint_without_base_prefix_streams(gpt2_dir: Path, tmp_path: Path,
                                                               no_base_load: None) -> None:
    """GPT-2's checkpoint on the Hub names ``h.0.attn.c_attn.weight`` for the module ``transformer.h.0.attn.c_attn``:
    the streaming merge maps the names instead of falling back to loading the whole base."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "hub-gpt2"
    shutil.copytree(gpt2_dir, base)
    weights = load_file(base / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in weights.items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    init = init_adapter(base, LoraSpec(rank=2, alpha=4.0, target_modules=("all-linear",)))
    state = _random_b(init.state, 5)
    result = merge_to_dir(base, state, rank=2, alpha=4.0, out_dir=tmp_path / "m")
    assert "h.0.attn.c_attn.weight" in result.merged_modules
    merged = load_file(tmp_path / "m" / result.shards[0])
    key = "base_model.model.transformer.h.0.attn.c_attn"
    want = weights["transformer.h.0.attn.c_attn.weight"] + 2.0 * (
        state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]).T
    assert torch.allclose(merged["h.0.attn.c_attn.weight"], want, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama3"])
def test_merge_in_row_blocks_equals_the_whole_tensor_merge(family: str, tmp_path: Path) -> None:
    """Blocks of a few rows (uneven last block, Conv1D ``[in, out]`` rows, a tied lm_head, a FedEx residual) give the
    very bytes of a merge that takes every tensor whole, and untouched tensors are copied bit for bit."""
    from safetensors.torch import load_file

    base = build_family_model(family)
    modules = ("all-linear",) if family == "gpt2" else ("q_proj", "down_proj")
    init = init_adapter(base, LoraSpec(rank=2, alpha=4.0, target_modules=modules, seed=3))
    state = _random_b(init.state, 11)
    layout = base_layout(base)
    g = torch.Generator().manual_seed(2)
    weights = load_file(base / "model.safetensors")
    if layout.tied and family == "llama3":  # an adapter on the tied, vocabulary-sized output projection too
        vocab, hidden = weights[layout.tied[0][1]].shape
        state["base_model.model.lm_head.lora_A.weight"] = torch.randn(2, hidden, generator=g) * 0.1
        state["base_model.model.lm_head.lora_B.weight"] = torch.randn(vocab, 2, generator=g) * 0.1
    some = next(k for k in sorted(weights) if weights[k].dim() == 2 and "embed" not in k and "wte" not in k)
    residual = {some: torch.randn(weights[some].shape, generator=g) * 0.01}
    whole = merge_to_dir(base, state, rank=2, alpha=4.0, out_dir=tmp_path / "whole", residual=residual, layout=layout)
    # 200 bytes of float32 work: one or two rows of these widths, so every weight spans many uneven blocks.
    blocks = merge_to_dir(base, state, rank=2, alpha=4.0, out_dir=tmp_path / "blocks", residual=residual,
                          layout=layout, chunk_bytes=200)
    assert whole.shards == blocks.shards and whole.merged_modules == blocks.merged_modules
    a, b = load_file(tmp_path / "whole" / whole.shards[0]), load_file(tmp_path / "blocks" / whole.shards[0])
    assert a.keys() == b.keys()
    # A block's matmul may take another BLAS kernel (FMA or not), so merged weights agree to float32 rounding.
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    untouched = [k for k in weights if k not in whole.merged_modules and k != some]
    assert untouched and all(torch.equal(b[k], weights[k]) for k in untouched)
    assert len(whole.merged_modules) > 1 and all(not torch.equal(b[k], weights[k]) for k in whole.merged_modules if k in weights)
    assert not torch.equal(b[some], weights[some])
    if family == "llama3":
        assert "lm_head.weight" in b and not torch.equal(b["lm_head.weight"], weights[layout.tied[0][1]])
