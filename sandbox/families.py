"""Tiny random-init bases of real model families, with their real chat templates, built locally (no download).

Each family is the real transformers config class (``LlamaConfig``, ``Qwen2Config``, ``MistralConfig``,
``Gemma2Config``, ``Phi3Config``, ``GPT2Config``) at a toy size (hidden 64, 2 layers, well under a million
parameters), with the family's special tokens and its stock Jinja chat template (simplified only where the token
layout is unchanged: no tool calls, no dates). None of the templates has ``{% generation %}`` markers, like the real
ones, and GPT-2 ships none at all: they exercise the project's own assistant-token masks
(:mod:`site_agent.training.masking`) the way real bases would.

The tokenizer is a ByteLevel BPE trained with ``tokenizers`` on the same local text as :mod:`sandbox.tiny_model`
(real Mistral, Gemma and Phi-3 use SentencePiece; the special tokens and the template's layout are what matter
here). Builds are cached and atomic like the house tiny model, under ``<cache root>/tiny-families/<hash>``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedcommon.manifest import Manifest
from sandbox.synthetic import vocabulary_text
from sandbox.tiny_model import INIT_STD, default_cache_root, install_cached, train_bpe

# Bump whenever the built files would change for the same family and shape (templates, tokens, init, save format).
FAMILIES_VERSION = "1"

# Llama 3 (Meta-Llama-3-8B-Instruct's template).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Qwen2.5-Instruct's ChatML without its tool-call branches: a default system prompt when none is given.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Mistral-7B-Instruct-v0.1/v0.2: no system role, roles must alternate, no generation prompt to add.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Gemma 2 (gemma-2-2b-it): refuses a system role, the assistant is "model".
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# Phi-3-mini-4k-instruct: note the eos_token it appends when no generation prompt is asked for.
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """A model family's special tokens, chat template and the LoRA targets that exist in its modules.

    Attributes:
        name: Key of :data:`FAMILIES`.
        special_tokens: Every special token, in id order from 0.
        bos: BOS token, or None.
        eos: EOS token of the tokenizer.
        pad: Pad token, or None (Llama 3, Mistral and GPT-2 ship none).
        unk: Unknown token, or None.
        end_of_turn: The token the template emits right after an assistant reply.
        chat_template: The Jinja template, or None (GPT-2).
        target_modules: Attention projections to put LoRA on.
    """

    name: str
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    end_of_turn: str
    chat_template: str | None
    target_modules: tuple[str, ...]


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama3", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"), "<|begin_of_text|>", "<|eot_id|>", None, None, "<|eot_id|>", LLAMA3_TEMPLATE,
           ("q_proj", "v_proj")),
    Family("qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|endoftext|>", None,
           "<|im_end|>", QWEN2_TEMPLATE, ("q_proj", "v_proj")),
    Family("mistral", ("<unk>", "<s>", "</s>"), "<s>", "</s>", None, "<unk>", "</s>", MISTRAL_TEMPLATE,
           ("q_proj", "v_proj")),
    Family("gemma2", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>",
           "<pad>", "<unk>", "<end_of_turn>", GEMMA2_TEMPLATE, ("q_proj", "v_proj")),
    Family("phi3", ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
           "<s>", "<|endoftext|>", "<|endoftext|>", "<unk>", "<|end|>", PHI3_TEMPLATE, ("qkv_proj",)),
    Family("gpt2", ("<|endoftext|>",), "<|endoftext|>", "<|endoftext|>", None, "<|endoftext|>", "<|endoftext|>",
           None, ("c_attn",)),
)}


@dataclass(frozen=True)
class FamilyShape:
    """Toy shape shared by every family (a few hundred thousand parameters)."""

    bpe_vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    seed: int = 0


def config_hash(family: Family, shape: FamilyShape) -> str:
    """16 hex digits over the family (template included), shape, builder version and tokenizer corpus."""
    corpus = hashlib.sha256(vocabulary_text().encode()).hexdigest()
    canonical = json.dumps({"version": FAMILIES_VERSION, "family": asdict(family), "shape": asdict(shape),
                            "corpus": corpus}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _tokenizer(family: Family, shape: FamilyShape):  # -> transformers.PreTrainedTokenizerFast
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(shape.bpe_vocab_size, list(family.special_tokens))
    named = {family.bos, family.eos, family.pad, family.unk}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad,
        unk_token=family.unk, additional_special_tokens=[t for t in family.special_tokens if t not in named],
        model_max_length=shape.max_position_embeddings)
    if family.chat_template is not None:
        fast.chat_template = family.chat_template
    return fast


def _model_config(family: Family, shape: FamilyShape, vocab: int, ids: dict[str, int | None]):  # -> PretrainedConfig
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                  initializer_range=INIT_STD, tie_word_embeddings=True, dtype="float32")
    decoder = dict(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                   num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
                   num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=shape.max_position_embeddings)
    if family.name == "llama3":
        return tf.LlamaConfig(**common, **decoder)
    if family.name == "qwen2":
        return tf.Qwen2Config(**common, **decoder)
    if family.name == "mistral":
        return tf.MistralConfig(**common, **decoder, sliding_window=None)
    if family.name == "gemma2":
        head_dim = shape.hidden_size // shape.num_attention_heads
        return tf.Gemma2Config(**common, **decoder, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                               sliding_window=shape.max_position_embeddings)
    if family.name == "phi3":
        return tf.Phi3Config(**common, **decoder, original_max_position_embeddings=shape.max_position_embeddings)
    if family.name == "gpt2":
        return tf.GPT2Config(**common, n_embd=shape.hidden_size, n_inner=shape.intermediate_size,
                             n_layer=shape.num_hidden_layers, n_head=shape.num_attention_heads,
                             n_positions=shape.max_position_embeddings)
    raise ValueError(f"unknown family {family.name!r}")


def _build_into(family: Family, shape: FamilyShape, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = _tokenizer(family, shape)
    ids = {k: (tokenizer.convert_tokens_to_ids(v) if v is not None else None)
           for k, v in (("bos", family.bos), ("eos", family.eos), ("pad", family.pad))}
    config = _model_config(family, shape, len(tokenizer), ids)
    torch.manual_seed(shape.seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.float()  # weights are created in torch's default dtype, which a caller may have changed
    eot = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    # Chat models stop at their end-of-turn token as well as at EOS (Llama 3, Gemma 2 and Phi-3 list both).
    eos = ids["eos"] if eot == ids["eos"] else [ids["eos"], eot]
    model.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=eos, pad_token_id=ids["pad"])
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    Manifest.of_dir(out).save(out)


def build_family_model(name: str, shape: FamilyShape = FamilyShape(), cache_dir: str | Path | None = None) -> Path:
    """Return the directory of the tiny ``name`` base (a key of :data:`FAMILIES`), building it on a cache miss.

    Args:
        name: ``llama3``, ``qwen2``, ``mistral``, ``gemma2``, ``phi3`` or ``gpt2``.
        shape: The toy shape and seed.
        cache_dir: Cache root; defaults to :func:`sandbox.tiny_model.default_cache_root`.

    Returns:
        A Hugging Face model directory with ``fedbridge-manifest.json``.
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {sorted(FAMILIES)}")
    family = FAMILIES[name]
    root = (Path(cache_dir) if cache_dir is not None else default_cache_root()) / "tiny-families"
    return install_cached(root, f"{name}-{config_hash(family, shape)}", lambda out: _build_into(family, shape, out))
