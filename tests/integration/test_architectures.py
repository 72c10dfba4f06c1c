"""The architecture matrix: a real federation on each model family, and the published model loads with stock libraries.

For every family of :mod:`sandbox.families` (Llama 3, Qwen2, Mistral, Gemma 2, Phi-3, GPT-2): a coordinator and two
site agents as processes on loopback with mTLS, ``all-linear`` targets, two rounds of a few steps, held-out scoring
each round; then ``AutoModelForCausalLM.from_pretrained(published/merged)`` and
``PeftModel.from_pretrained(base, published/adapter)`` from stock transformers/peft must give the same logits.

- SFT with FedEx-LoRA (default run): round 2's sites train on base + round 1's residual (GPT-2's Conv1D weights
  take it in their ``[in, out]`` layout). Under FedEx-LoRA the published adapter applies to base + residual, so
  ``adapter/`` on the PLAIN base does not reproduce ``merged/``: the test states that truth (the plain-base logits
  differ, base + ``base_residual.safetensors`` + adapter reproduce merged).
- DPO with FedAvg: ``adapter/`` on the plain base reproduces ``merged/``.

Each federation takes a couple of minutes on two cores: the default run has GPT-2 and Gemma 2 with SFT/FedEx-LoRA;
the other families and every DPO leg are marked ``slow``.

GPT-2 ships no chat template; until the federation can pin one (``[model] chat_template``), the test gives a copy
of the GPT-2 base a ChatML template in its tokenizer_config.json (and a fresh manifest).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from coordinator.rounds.store import Store
from fedcommon.manifest import Manifest
from sandbox import localfed
from sandbox.families import FAMILIES, build_family_model

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|endoftext|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PROMPT = torch.tensor([[3, 17, 42, 99, 7, 250, 11]])


def _base(name: str, tmp: Path) -> Path:
    base = build_family_model(name)
    if FAMILIES[name].chat_template is not None:
        return base
    copy = tmp / f"{name}-templated"
    shutil.copytree(base, copy)
    tc = json.loads((copy / "tokenizer_config.json").read_text())
    tc["chat_template"] = CHATML
    (copy / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (copy / "fedbridge-manifest.json").unlink()
    Manifest.of_dir(copy).save(copy)
    return copy


def _federate(tmp: Path, base: Path, *, strategy: str, mode: str) -> Store:
    fed = localfed.prepare(tmp, base, n_sites=2, rounds=2, strategy=strategy,
                           training={"mode": mode, "max_steps": 2, "batch_size": 2, "max_length": 64,
                                     "learning_rate": 5e-3},
                           lora={"rank": 2, "alpha": 4.0, "target_modules": ["all-linear"]}, n_train=8, n_heldout=2)
    if mode == "dpo":  # preference rows from each site's own questions; held-out stays SFT for the loss
        for s in fed.sites:
            rows = [json.loads(line) for line in s.train_path.read_text().splitlines()]
            prefs = [{"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"],
                      "rejected": "I do not know."} for r in rows]
            s.train_path.write_text("".join(json.dumps(p) + "\n" for p in prefs))
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            fed.start_site(s)
        codes = fed.wait([s.name for s in fed.sites] + ["coordinator"], timeout=300)
    assert set(codes.values()) == {0}, (codes, localfed._tail(fed.log_path("coordinator")),
                                        localfed._tail(fed.log_path("site-a")))
    store = Store(fed.state_dir)
    assert [r.state for r in store.rounds()] == ["closed", "closed"]
    for r in (1, 2, 3):  # every site scored every global adapter on its held-out rows
        assert {m[1] for m in store.metrics(r) if m[2] == "eval_global" and m[3] == "loss"} == {"site-a", "site-b"}
    return store


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=PROMPT).logits


def _published(store: Store) -> Path:
    pubs = store.publications()
    assert len(pubs) == 1
    return Path(pubs[0]["path"])


# GPT-2 (Conv1D) and Gemma 2 (tied embeddings, its own norms) run by default; each federation costs a couple of
# minutes on two cores, so the other families, covered by the same code paths, run with the slow tests.
DEFAULT_FAMILIES = ("gemma2", "gpt2")
SFT_MATRIX = [f if f in DEFAULT_FAMILIES else pytest.param(f, marks=pytest.mark.slow) for f in sorted(FAMILIES)]


@pytest.mark.parametrize("family", SFT_MATRIX)
def test_sft_fedex_lora(family: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = _base(family, tmp_path)
    store = _federate(tmp_path / "fed", base, strategy="fedex_lora", mode="sft")
    for r in store.rounds():
        assert r.info["aggregation_error"]["max"] < 1e-5
    pub = _published(store)
    merged = _logits(AutoModelForCausalLM.from_pretrained(pub / "merged"))
    plain = _logits(AutoModelForCausalLM.from_pretrained(base))
    assert not torch.allclose(merged, plain, atol=1e-4)  # the federation changed the model
    # The adapter alone, on the plain base, is not the merged model under FedEx-LoRA: the residual is missing.
    on_plain = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), pub / "adapter"))
    assert not torch.allclose(on_plain, merged, atol=1e-4)
    # Base + the published residual (in each weight's own layout, Conv1D included) + the adapter is.
    folded = AutoModelForCausalLM.from_pretrained(base)
    params = dict(folded.named_parameters())
    with torch.no_grad():
        for name, value in load_file(pub / "base_residual.safetensors").items():
            params[name].add_(value)
    assert torch.allclose(_logits(PeftModel.from_pretrained(folded, pub / "adapter")), merged, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dpo_fedavg(family: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _base(family, tmp_path)
    pub = _published(_federate(tmp_path / "fed", base, strategy="fedavg", mode="dpo"))
    merged = _logits(AutoModelForCausalLM.from_pretrained(pub / "merged"))
    adapter = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), pub / "adapter"))
    assert torch.allclose(adapter, merged, atol=1e-4)
    assert not torch.allclose(merged, _logits(AutoModelForCausalLM.from_pretrained(base)), atol=1e-4)
