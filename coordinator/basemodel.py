"""Checks of the base model at coordinator start that need no weights: LoRA target names and the chat template.

Both run before the coordinator loads any weight, so a federation whose adapter or template cannot train on its
base is refused in seconds with one message, rather than failing deep inside PEFT or at the first site.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.config import FederationConfig
from fedcommon.chat import TemplateError, TemplatePin, apply_chat_template_text, check_template, read_template_file
from fedcommon.chat import template_sha256 as _sha

# Modes whose rows are always chat conversations, so the base's own template must give an assistant mask. The
# preference modes may train on plain-string prompts and answers, which need no template.
CHAT_MODES = ("sft", "qlora")


class BaseModelError(ValueError):
    """The base model cannot be trained as federation.toml asks (the message says why and what to change)."""


def check_base_model(cfg: FederationConfig) -> TemplatePin:
    """Resolve ``[lora] target_modules`` and probe the chat template against ``cfg.base_model``; return the pin.

    Only ``config.json`` (the model is built on the meta device) and the tokenizer files are read.

    Raises:
        BaseModelError: A target module name matches nothing (the message lists those that exist), or the
            supplied / own chat template is one no assistant-token mask comes from.
    """
    return check_target_and_template(cfg.base_model, cfg.lora.target_modules, cfg.model.chat_template,
                                     cfg.training.mode)


def check_target_and_template(base_model: Path, target_modules: tuple[str, ...], template_file: Path | None,
                              mode: str = "sft") -> TemplatePin:
    """:func:`check_base_model` on its parts (``fedbridge-admin init`` has no federation.toml yet)."""
    from fedcommon.models import TargetModuleError, check_target_modules

    try:
        check_target_modules(base_model, target_modules)
    except TargetModuleError as e:
        raise BaseModelError(str(e)) from None
    except (OSError, ValueError) as e:  # no or unreadable config.json
        raise BaseModelError(f"base model at {base_model}: cannot read its config.json: {e}") from None
    return template_pin(base_model, template_file, mode)


def template_pin(base_model: Path, template_file: Path | None, mode: str = "sft") -> TemplatePin:
    """The chat template the federation trains with (the supplied file, else the base's own) and its SHA-256.

    Raises:
        BaseModelError: The file cannot be read, or the template in force cannot give an assistant mask (for a
            supplied file always; for the base's own in the chat modes, where every row is a conversation).
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"base model at {base_model}: cannot load its tokenizer: {e}") from None
    try:
        if template_file is not None:
            text = read_template_file(template_file)
            apply_chat_template_text(tokenizer, text)
            return TemplatePin(text, _sha(text))
        if mode in CHAT_MODES:
            check_template(tokenizer)
    except TemplateError as e:
        if template_file is not None:
            raise BaseModelError(f"field 'model.chat_template' ({template_file}): {e}") from None
        raise BaseModelError(str(e) if str(e).startswith("base model at") else f"base model at {base_model}: {e}") \
            from None
    return TemplatePin("", _sha(getattr(tokenizer, "chat_template", None)))
