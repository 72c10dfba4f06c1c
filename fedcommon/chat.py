"""Assistant-token masks derived from a tokenizer's own chat template, with no ``{% generation %}`` markers needed.

Real chat templates (ChatML, Llama 3, Mistral ``[INST]``, Gemma, Phi-3) do not mark the assistant's tokens, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` returns an all-zero mask for them and TRL's
``assistant_only_loss`` refuses them. This module works the mask out from renderings of the conversation instead:

* The whole conversation is rendered once and tokenized with character offsets.
* For each assistant turn ``i``, the conversation before it is rendered with ``add_generation_prompt=True`` (what
  the model sees when it is asked to answer) and the conversation through turn ``i`` without it. The reply is what
  the second adds to the first; it must then sit at the same place in the whole rendering (the *prefix property*).
  The reply span runs from the end of the generation prompt to the end of the reply's content plus the special
  token the template emits right after it (the end-of-turn token, so the model learns to stop); whitespace after
  those (ChatML's newline) belongs to no one.
* A template that re-renders earlier turns differently once later ones follow breaks the prefix property; then each
  reply is looked up, in order, in the whole rendering right after the generation prompt's marker. If neither works
  the template is refused with :class:`TemplateError`, which says why: a wrong mask would train the wrong tokens
  silently.

Tokens are marked when their characters overlap a reply span, as transformers does for ``{% generation %}``.
Messages never include conversation text: they end up in logs.

The module is pure (no torch, no transformers import): the coordinator probes the federation's template at start
with the same code the sites train with. A chat template is data, not code: transformers renders it in Jinja's
sandboxed environment (no attribute access to Python internals, no imports, no file or network access), so a
template that reaches a site with a task can at worst render wrong text, which the hash pin and the probe refuse.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

# The probe conversation of check_template: made-up words that no template's own text contains.
_PROBE_SYSTEM = "Probe system zeta."
_PROBE = (("user", "Probe question alpha?"), ("assistant", "Probe reply bravo."),
          ("user", "Probe question charlie?"), ("assistant", "Probe reply delta."))


class TemplateError(ValueError):
    """A chat template the assistant-token mask cannot be derived from (or no template at all)."""


class MaskedChat(NamedTuple):
    """A tokenized conversation and which of its tokens belong to assistant replies.

    Attributes:
        input_ids: Token ids of the whole conversation as the chat template renders it.
        assistant_mask: 1 on the tokens of assistant replies (their end-of-turn token included), 0 elsewhere.
    """

    input_ids: list[int]
    assistant_mask: list[int]


def _no_template_error(tokenizer: Any) -> TemplateError:
    where = getattr(tokenizer, "name_or_path", "") or "(unknown path)"
    return TemplateError(f"base model at {where} has no chat template; set [model] chat_template = \"file.jinja\" "
                         "in federation.toml")


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError:
        raise
    except Exception as e:  # jinja's raise_exception (system role, roles that do not alternate) and render errors
        # The template's own message (e.g. "System role not supported") names the rule; it holds no row data.
        raise TemplateError(f"the chat template refuses this conversation: {type(e).__name__}: {e}") from e
    if not isinstance(text, str):
        raise TemplateError("the chat template did not render to text")
    return text


def _special_tokens(tokenizer: Any) -> list[str]:
    """The tokenizer's special and added tokens, longest first (so a short one never shadows a longer one).

    Added tokens count too: some hubs' tokenizers register a family's end-of-turn token without the special flag.
    """
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    names |= {str(getattr(t, "content", t)) for t in added.values()}
    return sorted((n for n in names if n), key=len, reverse=True)


def _reply_end(text: str, content_end: int, specials: list[str]) -> int:
    """Where the reply ends: after its content and the one special token right after it (the end-of-turn token).

    Only one: the next turn's opening token (``[INST]`` where it is special) follows directly in some templates.
    """
    nxt = next((s for s in specials if text.startswith(s, content_end)), "")
    return content_end + len(nxt)


def _find_content(text: str, content: str, start: int) -> tuple[int, int] | None:
    """First ``content`` in ``text`` at or after ``start`` (templates often ``| trim`` it); its (start, end)."""
    for variant in dict.fromkeys((content, content.strip())):
        pos = text.find(variant, start)
        if pos >= 0:
            return pos, pos + len(variant)
    return None


def _assistant_turns(messages: list[dict[str, Any]]) -> list[int]:
    return [i for i, m in enumerate(messages) if m.get("role") == "assistant"]


def _spans_by_prefix(tokenizer: Any, messages: list[dict[str, Any]], full: str,
                     specials: list[str]) -> list[tuple[int, int]]:
    """Reply spans from prefix renderings; raises TemplateError naming the turn where the prefix property fails."""
    spans = []
    for i in _assistant_turns(messages):
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise TemplateError(f"template re-renders earlier turns: the conversation before turn {i} with the "
                                "generation prompt is not a prefix of the whole conversation")
        if not through.startswith(prompt):
            raise TemplateError(f"the generation prompt before turn {i} is not a prefix of the conversation "
                                f"through turn {i}")
        found = _find_content(through, str(messages[i].get("content", "")), len(prompt))
        if found is None:
            raise TemplateError(f"the reply of turn {i} does not appear in the conversation through turn {i}")
        end = _reply_end(through, found[1], specials)
        if full[len(prompt):end] != through[len(prompt):end]:
            raise TemplateError(f"template re-renders earlier turns: the reply of turn {i} renders differently "
                                "once later turns follow")
        spans.append((len(prompt), end))
    return spans


def _spans_by_search(tokenizer: Any, messages: list[dict[str, Any]], full: str,
                     specials: list[str]) -> list[tuple[int, int]]:
    """Reply spans found by locating each message's content in order, each reply after the generation marker."""
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        content = str(message.get("content", ""))
        if message.get("role") != "assistant":
            found = _find_content(full, content, cursor)
            if found is not None:  # a template may drop or rewrite a system prompt; that is no assistant token
                cursor = found[1]
            continue
        # The marker is what add_generation_prompt appends ("<|im_start|>assistant\n"); empty for templates whose
        # prompt ends at the user's turn ([INST] ... [/INST]).
        without = _render(tokenizer, messages[:i], add_generation_prompt=False)
        marker = _render(tokenizer, messages[:i], add_generation_prompt=True)[len(without):]
        start = cursor
        if marker.strip():
            at = full.find(marker, cursor)
            if at < 0:
                raise TemplateError(f"the generation prompt of turn {i} does not appear in the whole conversation")
            start = at + len(marker)
        found = _find_content(full, content, start)
        if found is None:
            raise TemplateError(f"the reply of turn {i} does not appear in the whole conversation")
        end = _reply_end(full, found[1], specials)
        spans.append((start, end))
        cursor = end
    return spans


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering of ``messages`` and the character span of each assistant reply in it.

    Raises:
        TemplateError: No chat template, a template that refuses the conversation, or one that neither keeps the
            prefix property nor renders each reply recognisably.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise _no_template_error(tokenizer)
    full = _render(tokenizer, messages, add_generation_prompt=False)
    specials = _special_tokens(tokenizer)
    try:
        return full, _spans_by_prefix(tokenizer, messages, full, specials)
    except TemplateError as prefix_error:
        try:
            return full, _spans_by_search(tokenizer, messages, full, specials)
        except TemplateError as search_error:
            raise TemplateError(f"cannot derive the assistant-token mask: {prefix_error}; and {search_error}") \
                from prefix_error


def mask_conversation(tokenizer: Any, messages: list[dict[str, Any]]) -> MaskedChat:
    """Tokenize ``messages`` with the tokenizer's chat template and mark the assistant replies' tokens.

    Args:
        tokenizer: A fast tokenizer (character offsets are needed) with a ``chat_template``.
        messages: ``[{"role": ..., "content": ...}, ...]``.

    Returns:
        The conversation's token ids and its assistant mask (same length).

    Raises:
        TemplateError: See :func:`assistant_spans`; also a tokenizer without offsets (a slow tokenizer).
    """
    full, spans = assistant_spans(tokenizer, messages)
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("the assistant-token mask needs a fast tokenizer (tokenizer.json) for character offsets")
    # The rendering holds the template's own special tokens (BOS included), as apply_chat_template tokenizes it.
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for s, e in enc["offset_mapping"]:
        e = max(e, s + 1)  # a token trimmed to no characters still sits at s
        mask.append(int(any(s < end and e > start for start, end in spans)))
    return MaskedChat(list(enc["input_ids"]), mask)


def check_template(tokenizer: Any) -> None:
    """Probe the tokenizer's chat template with a synthetic two-exchange conversation; refuse it if no mask comes.

    The probe has a system turn, and is retried without one for templates that reject the system role (Gemma 2,
    Mistral's ``[INST]``). Each reply must be marked exactly, and end in a special token (the end-of-turn token,
    without which the model never learns to stop).

    Raises:
        TemplateError: Why the template cannot be trained with (no template, refused, no mask, no end-of-turn).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise _no_template_error(tokenizer)
    turns = [{"role": r, "content": c} for r, c in _PROBE]
    try:
        full, spans = assistant_spans(tokenizer, [{"role": "system", "content": _PROBE_SYSTEM}, *turns])
    except TemplateError:
        full, spans = assistant_spans(tokenizer, turns)  # this error, if any, is the one to report
    replies = [c for r, c in _PROBE if r == "assistant"]
    if len(spans) != len(replies):
        raise TemplateError("the chat template's assistant-token mask does not cover every assistant turn")
    specials = _special_tokens(tokenizer)
    for (start, end), reply in zip(spans, replies, strict=True):
        marked = full[start:end]
        if reply.strip() not in marked:
            raise TemplateError("the chat template's assistant-token mask misses an assistant reply")
        if not any(marked.endswith(s) for s in specials):
            raise TemplateError("the chat template emits no end-of-turn token after an assistant reply, so the "
                                "model would never learn to stop")
    mask_conversation(tokenizer, turns)  # a slow tokenizer is refused here too


def read_template_file(path: str | Path) -> str:
    """The text of a Jinja chat template file.

    Raises:
        TemplateError: The file cannot be read, is not UTF-8, or is empty.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TemplateError(f"cannot read chat template file {path}: {e.strerror}") from e
    except UnicodeDecodeError:
        raise TemplateError(f"chat template file {path} is not UTF-8 text") from None
    if not text.strip():
        raise TemplateError(f"chat template file {path} is empty")
    return text


def apply_chat_template_text(tokenizer: Any, text: str) -> Any:
    """Give ``tokenizer`` the chat template ``text`` (for a base that ships none), after probing it.

    Returns:
        The same tokenizer, its ``chat_template`` set.

    Raises:
        TemplateError: :func:`check_template` refuses the template (the tokenizer keeps its previous one).
    """
    previous = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = text
    try:
        check_template(tokenizer)
    except TemplateError:
        tokenizer.chat_template = previous
        raise
    return tokenizer


def apply_chat_template_file(tokenizer: Any, path: str | Path) -> Any:
    """Give ``tokenizer`` the Jinja chat template in ``path``, after probing it (see :func:`apply_chat_template_text`).

    Raises:
        TemplateError: The file cannot be read, or :func:`check_template` refuses the template.
    """
    return apply_chat_template_text(tokenizer, read_template_file(path))


def template_sha256(template: str | dict[str, str] | None) -> str:
    """Hex SHA-256 of a chat template: of its UTF-8 text, or of the canonical JSON of named templates; "" for none."""
    if not template:
        return ""
    data = template.encode("utf-8") if isinstance(template, str) else \
        json.dumps(template, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TemplatePin:
    """The chat template a federation trains with, as its tasks pin it.

    Attributes:
        text: The template the federation supplies (``[model] chat_template``); "" when the sites use the base
            tokenizer's own (which the base model's manifest already pins, file by file).
        sha256: :func:`template_sha256` of the template in force (supplied or the base's own); "" if none.
    """

    text: str = ""
    sha256: str = ""


class TemplateMismatch(ValueError):
    """A task's chat template does not hash to the pin the task names, or the site's tokenizer's does not."""


def apply_pinned_template(tokenizer: Any, text: str, sha256: str) -> Any:
    """Give ``tokenizer`` the federation's pinned chat template and check the pin; return the tokenizer.

    ``text`` is the template the task carried ("" for the base tokenizer's own); ``sha256`` the task's pin ("" if
    the task pins none, e.g. an older coordinator). The supplied text is checked against the pin before it touches
    the tokenizer; the template in force afterwards must hash to the pin too.

    Raises:
        TemplateMismatch: The text, or the tokenizer's own template, hashes to something else than the pin.
        TemplateError: The pinned template is one no assistant mask comes from.
    """
    if text:
        got = template_sha256(text)
        if sha256 and got != sha256:
            raise TemplateMismatch(f"the task's chat template hashes to {got[:16]}…, but the task pins "
                                   f"{sha256[:16]}…")
        apply_chat_template_text(tokenizer, text)
    if sha256:
        got = template_sha256(getattr(tokenizer, "chat_template", None))
        if got != sha256:
            raise TemplateMismatch(f"the base model's chat template hashes to {got[:16] or '(none)'}…, but the task "
                                   f"pins {sha256[:16]}…")
    return tokenizer
