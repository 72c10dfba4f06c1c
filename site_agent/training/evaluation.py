"""Site-private accuracy on multiple-choice held-out data (issue 4, item 8). Only the number leaves the site.

A held-out row is multiple-choice when its last user turn lists at least two options on lines of their own,
labelled ``A.``, ``A)``, ``A:`` or ``(A)`` (letters A–D), and the answer (the last assistant turn) is exactly one of
those letters. A file is scored for accuracy only when every row is multiple-choice, so a mixed file never reports a
misleading number.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from site_agent.training.masking import mask_conversation

LETTERS = "ABCD"
_OPTION = re.compile(r"^\s*\(?([A-D])[).:]\s*\S", re.MULTILINE)


def mcq_options(row: dict[str, Any]) -> tuple[str, ...] | None:
    """The option letters of a multiple-choice chat row, or None when the row is not multiple-choice."""
    msgs = row.get("messages") or []
    if len(msgs) < 2 or msgs[-1].get("role") != "assistant" or msgs[-2].get("role") != "user":
        return None
    letters = tuple(dict.fromkeys(_OPTION.findall(str(msgs[-2].get("content", "")))))
    answer = str(msgs[-1].get("content", "")).strip()
    return letters if len(letters) >= 2 and answer in letters else None


def is_mcq(rows: list[dict[str, Any]]) -> bool:
    """True when every row is multiple-choice (and there is at least one)."""
    return bool(rows) and all(mcq_options(r) is not None for r in rows)


def _answer_token(tokenizer: Any, messages: list[dict[str, Any]], letter: str) -> tuple[list[int], int]:
    """The conversation's tokens with ``letter`` as the answer, and the position of the answer's first token."""
    ids, mask = mask_conversation(tokenizer, [*messages[:-1], {"role": "assistant", "content": letter}])
    if 1 not in mask:
        raise ValueError("the chat template marks no assistant tokens; cannot score multiple-choice answers")
    return ids, mask.index(1)


@torch.no_grad()
def mcq_choices(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> list[str]:
    """The model's greedy choice per row: the option letter whose first answer token has the highest logit.

    Raises:
        ValueError: A row that is not multiple-choice, or options the tokenizer cannot tell apart at the answer.
    """
    was_training = model.training
    model.eval()
    choices = []
    try:
        for row in rows:
            letters = mcq_options(row)
            if letters is None:
                raise ValueError("held-out row is not multiple-choice")
            ids, pos = _answer_token(tokenizer, row["messages"], letters[0])
            encoded = [_answer_token(tokenizer, row["messages"], x) for x in letters]
            if any(p != pos or e[:pos] != ids[:pos] for e, p in encoded):
                raise ValueError("the option letters change the tokens before the answer; cannot score them")
            candidates = [e[pos] for e, _ in encoded]
            if len(set(candidates)) != len(candidates):
                raise ValueError("the option letters do not tokenize to distinct first answer tokens")
            device = model.get_input_embeddings().weight.device
            logits = model(input_ids=torch.tensor([ids[:pos]], device=device)).logits[0, -1]
            choices.append(letters[int(torch.argmax(logits[candidates].float()))])
    finally:
        model.train(was_training)
    return choices


def mcq_accuracy(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> float:
    """Fraction of rows whose greedy choice (see :func:`mcq_choices`) is the row's answer letter."""
    choices = mcq_choices(model, tokenizer, rows)
    gold = [str(r["messages"][-1]["content"]).strip() for r in rows]
    return sum(c == g for c, g in zip(choices, gold, strict=True)) / len(rows)
