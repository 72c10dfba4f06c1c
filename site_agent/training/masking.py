"""Assistant-token masks from the tokenizer's chat template: re-exported from :mod:`fedcommon.chat`.

The derivation lives in ``fedcommon`` because the coordinator probes the federation's template at start with the
very code the sites train with, and the coordinator never imports ``site_agent``.
"""

from fedcommon.chat import (
    MaskedChat,
    TemplateError,
    TemplateMismatch,
    apply_chat_template_file,
    apply_chat_template_text,
    apply_pinned_template,
    assistant_spans,
    check_template,
    mask_conversation,
    read_template_file,
    template_sha256,
)

__all__ = ["MaskedChat", "TemplateError", "TemplateMismatch", "apply_chat_template_file", "apply_chat_template_text",
           "apply_pinned_template", "assistant_spans", "check_template", "mask_conversation", "read_template_file",
           "template_sha256"]
