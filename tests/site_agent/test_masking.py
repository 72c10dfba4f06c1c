"""Assistant-token masks from real families' own chat templates (no ``{% generation %}`` markers), and one real SFT
step plus held-out and multiple-choice scoring on each tiny family base."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator.config import LoraSpec
from coordinator.rounds.adapter import init_adapter
from protos.fedbridge.v1 import federation_service_pb2 as pb
from sandbox.families import FAMILIES, build_family_model
from site_agent.training.evaluation import mcq_choices
from site_agent.training.masking import TemplateError, apply_chat_template_file, check_template, mask_conversation
from site_agent.training.trainer import SftSiteTrainer

TEMPLATED = ("llama3", "qwen2", "mistral", "gemma2", "phi3")
WITH_SYSTEM = ("llama3", "qwen2", "phi3")  # Mistral [INST] and Gemma 2 refuse a system turn

# What a federation would ship for GPT-2 (which has none): ChatML-like turns ended by its only special token. The
# generation prompt ends in a newline, not a space: a BPE token " Paris" would straddle prompt and reply.
GPT2_TEMPLATE = ("{% for m in messages %}{{ m['role'] + '\\n' + m['content'] + '<|endoftext|>' + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'assistant\\n' }}{% endif %}")

CHAT = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome"}]
SYSTEM = {"role": "system", "content": "Answer with one word."}


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Builds (once per session, into ``$FEDBRIDGE_CACHE`` if set) the tiny base of a family."""
    cache = os.environ.get("FEDBRIDGE_CACHE") or tmp_path_factory.mktemp("fedbridge-cache")
    return lambda name: build_family_model(name, cache_dir=cache)


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _marked_runs(tokenizer: Any, messages: list[dict[str, str]]) -> list[str]:
    """The masked tokens, decoded one contiguous run at a time."""
    ids, mask = mask_conversation(tokenizer, messages)
    runs: list[list[int]] = []
    for i, (token, bit) in enumerate(zip(ids, mask, strict=True)):
        if bit:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tokenizer.decode(r) for r in runs]


def _gpt2_with_template(family_dir: Callable[[str], Path], tmp_path: Path) -> Path:
    """A copy of the GPT-2 base whose tokenizer carries GPT2_TEMPLATE (as a federation-supplied file would)."""
    base = tmp_path / "gpt2"
    shutil.copytree(family_dir("gpt2"), base)
    (tmp_path / "gpt2.jinja").write_text(GPT2_TEMPLATE)
    tokenizer = apply_chat_template_file(_tokenizer(base), tmp_path / "gpt2.jinja")
    tokenizer.save_pretrained(base, save_jinja_files=False)
    return base


@pytest.mark.parametrize("name", TEMPLATED)
def test_mask_is_exactly_the_replies_and_end_of_turn(name: str, family_dir: Callable[[str], Path]) -> None:
    # Prepare
    tokenizer = _tokenizer(family_dir(name))
    eot = FAMILIES[name].end_of_turn

    # Execute
    runs = _marked_runs(tokenizer, CHAT)

    # Assert: both replies of the multi-turn chat, each with the end-of-turn token, and nothing else
    assert runs == [f"Paris{eot}", f"Rome{eot}"]
    ids, _ = mask_conversation(tokenizer, CHAT)
    assert ids == list(tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"])


@pytest.mark.parametrize("name", WITH_SYSTEM)
def test_mask_with_a_system_turn(name: str, family_dir: Callable[[str], Path]) -> None:
    # Prepare
    tokenizer = _tokenizer(family_dir(name))
    eot = FAMILIES[name].end_of_turn

    # Execute / Assert: the system prompt (or Qwen's default one, above) is never trained
    assert _marked_runs(tokenizer, [SYSTEM, *CHAT]) == [f"Paris{eot}", f"Rome{eot}"]


@pytest.mark.parametrize("name", TEMPLATED)
def test_stock_templates_pass_the_probe(name: str, family_dir: Callable[[str], Path]) -> None:
    # Execute / Assert: Gemma 2 and Mistral are probed again without the system turn they refuse
    check_template(_tokenizer(family_dir(name)))


@pytest.mark.parametrize("name, message", [("gemma2", "System role not supported"),
                                           ("mistral", "Conversation roles must alternate")])
def test_template_refusing_the_conversation_is_a_template_error(name: str, message: str,
                                                                family_dir: Callable[[str], Path]) -> None:
    # Prepare
    tokenizer = _tokenizer(family_dir(name))

    # Execute / Assert
    with pytest.raises(TemplateError, match=message):
        mask_conversation(tokenizer, [SYSTEM, *CHAT])
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        mask_conversation(tokenizer, [CHAT[0], CHAT[0], CHAT[1]])


def test_template_dropping_earlier_replies_is_refused(family_dir: Callable[[str], Path]) -> None:
    # Prepare: ChatML that only renders the last assistant turn, so earlier replies have no tokens to mark
    tokenizer = _tokenizer(family_dir("qwen2"))
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

    # Execute / Assert
    with pytest.raises(TemplateError, match="re-renders earlier turns.*turn 1 .*not a prefix"):
        mask_conversation(tokenizer, CHAT)
    with pytest.raises(TemplateError, match="re-renders earlier turns"):
        check_template(tokenizer)


def test_template_rerendering_earlier_turns_falls_back_to_search(family_dir: Callable[[str], Path]) -> None:
    # Prepare: like Qwen3, an empty think block only on the final assistant turn, so the conversation through
    # turn 1 renders that reply differently from the whole conversation
    tokenizer = _tokenizer(family_dir("qwen2"))
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['role'] == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
        "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

    # Execute / Assert: each reply from the end of its generation prompt to its <|im_end|>
    assert _marked_runs(tokenizer, CHAT) == ["Paris<|im_end|>", "<think>\n\n</think>\n\nRome<|im_end|>"]


def test_template_without_end_of_turn_token_is_refused(family_dir: Callable[[str], Path]) -> None:
    # Prepare
    tokenizer = _tokenizer(family_dir("qwen2"))
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")

    # Execute / Assert
    with pytest.raises(TemplateError, match="no end-of-turn token"):
        check_template(tokenizer)


def test_gpt2_without_a_template_names_the_fix(family_dir: Callable[[str], Path], tmp_path: Path) -> None:
    # Prepare
    base = family_dir("gpt2")
    tokenizer = _tokenizer(base)
    rows = [{"messages": CHAT}]

    # Execute / Assert: refused at the probe, at masking and when the trainer starts (before loading weights)
    fix = r'has no chat template; set \[model\] chat_template = "file.jinja" in federation.toml'
    for call in (lambda: check_template(tokenizer), lambda: mask_conversation(tokenizer, CHAT),
                 lambda: SftSiteTrainer(base, rows, tmp_path / "work")):
        with pytest.raises(TemplateError, match=fix):
            call()
    with pytest.raises(TemplateError, match="cannot read chat template file"):
        apply_chat_template_file(tokenizer, tmp_path / "missing.jinja")
    assert tokenizer.chat_template is None


def test_gpt2_works_once_a_template_file_is_applied(family_dir: Callable[[str], Path], tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "chat.jinja"
    path.write_text(GPT2_TEMPLATE)

    # Execute
    tokenizer = apply_chat_template_file(_tokenizer(family_dir("gpt2")), path)

    # Assert
    assert _marked_runs(tokenizer, CHAT) == ["Paris<|endoftext|>", "Rome<|endoftext|>"]


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"},
                          {"role": "user", "content": "And twice that?"},
                          {"role": "assistant", "content": f"{4 * i}"}]} for i in range(n)]


@pytest.mark.parametrize("name", [*TEMPLATED, "gpt2"])
def test_one_sft_step_and_evaluation(name: str, family_dir: Callable[[str], Path], tmp_path: Path) -> None:
    # Prepare: all-linear resolves to each family's own projections (Conv1D c_attn/c_fc/c_proj on GPT-2)
    base = _gpt2_with_template(family_dir, tmp_path) if name == "gpt2" else family_dir(name)
    init = init_adapter(base, LoraSpec(rank=4, alpha=8.0, target_modules=("all-linear",)))
    trainer = SftSiteTrainer(base, _rows(4), tmp_path / "work")
    task = pb.Task(round=1, training=pb.TrainingConfig(mode="sft", max_steps=1, learning_rate=1e-2,
                                                       per_device_batch_size=2, max_length=64, seed=0),
                   adapter_spec=init.spec, hints=pb.SiteHints())

    # Execute
    result = trainer.train_round(task, init.state)
    loss, tokens = trainer.evaluate(init.spec, init.state, _rows(2))

    # Assert
    assert math.isfinite(result.train_loss) and result.train_loss > 0
    assert result.delta and any(float(v.abs().sum()) > 0 for k, v in result.delta.items() if "lora_B" in k)
    assert math.isfinite(loss) and loss > 0
    masked = sum(sum(mask_conversation(trainer.tokenizer, r["messages"]).assistant_mask[1:]) for r in _rows(2))
    assert tokens == masked


@pytest.mark.parametrize("name", TEMPLATED)
def test_multiple_choice_scoring(name: str, family_dir: Callable[[str], Path]) -> None:
    # Prepare
    from transformers import AutoModelForCausalLM

    base = family_dir(name)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    prompt = "Which is a colour?\nA. Red\nB. Table\nC. Seven\nAnswer with the letter."
    row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "A"}]}

    # Execute
    choices = mcq_choices(model, _tokenizer(base), [row])

    # Assert
    assert choices[0] in ("A", "B", "C")


def test_agrees_with_generation_markers_where_a_template_has_them(tiny_model_dir: Path) -> None:
    # Prepare: the house template marks replies with {% generation %}, which transformers turns into a mask itself
    tokenizer = _tokenizer(tiny_model_dir)
    messages = [SYSTEM, *CHAT]

    # Execute
    ours = mask_conversation(tokenizer, messages)
    theirs = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)

    # Assert: the same tokens and the same mask, so the house model trains exactly as it did under TRL's own path
    assert ours.input_ids == list(theirs["input_ids"])
    assert ours.assistant_mask == list(theirs["assistant_masks"])
