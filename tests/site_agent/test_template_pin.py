"""The site applies the federation's chat template only if it hashes to the task's pin; FedAvg weights from data."""

from __future__ import annotations

import os

import pytest

from fedcommon.chat import TemplateMismatch, apply_pinned_template, template_sha256
from protos.fedbridge.v1 import federation_service_pb2 as pb
from sandbox.families import build_family_model
from site_agent.agent import TemplateRefusal, check_template_pin
from site_agent.training.trainer import data_weight

GPT2_TEMPLATE = ("{% for m in messages %}{{ m['role'] + '\\n' + m['content'] + '<|endoftext|>' + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def gpt2_tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    cache = os.environ.get("FEDBRIDGE_CACHE") or tmp_path_factory.mktemp("fedbridge-cache")
    return lambda: AutoTokenizer.from_pretrained(build_family_model("gpt2", cache_dir=cache))


def test_task_template_must_hash_to_its_pin() -> None:
    pin = template_sha256(GPT2_TEMPLATE)
    check_template_pin(pb.Task(chat_template=GPT2_TEMPLATE, chat_template_sha256=pin))
    check_template_pin(pb.Task(chat_template_sha256=pin))  # the base's own: the trainer checks it on the tokenizer
    with pytest.raises(TemplateRefusal, match="hashes to .* but the task pins"):
        check_template_pin(pb.Task(chat_template=GPT2_TEMPLATE + " ", chat_template_sha256=pin))
    with pytest.raises(TemplateRefusal, match=r"pins \(nothing\)"):
        check_template_pin(pb.Task(chat_template=GPT2_TEMPLATE))


def test_pinned_template_is_applied_only_when_it_matches(gpt2_tokenizer) -> None:  # type: ignore[no-untyped-def]
    tok = apply_pinned_template(gpt2_tokenizer(), GPT2_TEMPLATE, template_sha256(GPT2_TEMPLATE))
    assert tok.chat_template == GPT2_TEMPLATE
    tok = gpt2_tokenizer()
    with pytest.raises(TemplateMismatch):
        apply_pinned_template(tok, GPT2_TEMPLATE, template_sha256("something else"))
    assert not tok.chat_template  # nothing was applied
    with pytest.raises(TemplateMismatch, match=r"base model's chat template hashes to \(none\)"):
        apply_pinned_template(gpt2_tokenizer(), "", template_sha256(GPT2_TEMPLATE))  # GPT-2 has none of its own


def test_weight_is_what_the_site_holds() -> None:
    t = pb.TrainingConfig(max_steps=20, per_device_batch_size=8)
    assert data_weight(t, 37, lambda: 999) == 37  # not max_steps x batch = 160, the same at every site
    t.weight_by = "tokens"
    assert data_weight(t, 37, lambda: 999) == 999
