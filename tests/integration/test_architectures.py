"""The architecture matrix: a real federation on each model family, and the published model loads with stock libraries.

For every family of :mod:`sandbox.families` (Llama 3, Qwen2, Mistral, Gemma 2, Phi-3, GPT-2): a coordinator and two
site agents as processes on loopback with mTLS, ``all-linear`` targets, rounds of a few steps, held-out scoring
each round; then ``AutoModelForCausalLM.from_pretrained(published/merged)`` and
``PeftModel.from_pretrained(base, published/adapter)`` from stock transformers/peft must give the same logits.

- SFT with FedEx-LoRA: round 2's sites train on base + round 1's residual (GPT-2's Conv1D weights take it in their
  ``[in, out]`` layout). Under FedEx-LoRA the published adapter applies to base + residual, so ``adapter/`` on the
  PLAIN base does not reproduce ``merged/``: the test states that truth (the plain-base logits differ, base +
  ``base_residual.safetensors`` + adapter reproduce merged).
- DPO with FedAvg, one round (the SFT legs carry state across rounds): ``adapter/`` on the plain base reproduces
  ``merged/``. Mistral's and Qwen2's DPO legs run with ``-m slow``.

Ten of the twelve legs run in the default test run.

GPT-2 ships no chat template: the federation supplies one (``[model] chat_template``, a ChatML file), which reaches
the sites with the task; the base directory itself is the stock one, untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coordinator.rounds.store import Store
from sandbox import localfed
from sandbox.families import FAMILIES, build_family_model

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|endoftext|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PROMPT = torch.tensor([[3, 17, 42, 99, 7, 250, 11]])


def _template(name: str, tmp: Path) -> Path | None:
    """The federation's template file for a family that ships none (GPT-2), else None (the base's own)."""
    if FAMILIES[name].chat_template is not None:
        return None
    path = tmp / "chatml.jinja"
    path.write_text(CHATML)
    return path


def _federate(tmp: Path, base: Path, *, strategy: str, mode: str, chat_template: Path | None, rounds: int = 2) -> Store:
    fed = localfed.prepare(tmp, base, n_sites=2, rounds=rounds, strategy=strategy, chat_template=chat_template,
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
    assert [r.state for r in store.rounds()] == ["closed"] * rounds
    for r in range(1, rounds + 2):  # every site scored every global adapter on its held-out rows
        assert {m[1] for m in store.metrics(r) if m[2] == "eval_global" and m[3] == "loss"} == {"site-a", "site-b"}
    return store


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=PROMPT).logits


def _published(store: Store) -> Path:
    pubs = store.publications()
    assert len(pubs) == 1
    return Path(pubs[0]["path"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sft_fedex_lora(family: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = build_family_model(family)
    store = _federate(tmp_path / "fed", base, strategy="fedex_lora", mode="sft",
                      chat_template=_template(family, tmp_path))
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


# Mistral and Qwen2 are Llama-shaped for DPO's purposes (their own shapes and templates run in the SFT legs above):
# their DPO legs run with -m slow, to keep the default run under its time limit.
DPO_SLOW = ("mistral", "qwen2")


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in DPO_SLOW else f
                                    for f in sorted(FAMILIES)])
def test_dpo_fedavg(family: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = build_family_model(family)
    pub = _published(_federate(tmp_path / "fed", base, strategy="fedavg", mode="dpo",
                               chat_template=_template(family, tmp_path), rounds=1))
    merged = _logits(AutoModelForCausalLM.from_pretrained(pub / "merged"))
    adapter = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), pub / "adapter"))
    assert torch.allclose(adapter, merged, atol=1e-4)
    assert not torch.allclose(merged, _logits(AutoModelForCausalLM.from_pretrained(base)), atol=1e-4)
