"""Read and validate a site's private training data (jsonl).

Eight row formats are understood:

- **chat** SFT: ``{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", ...}]}``
- **sharegpt** SFT: ``{"conversations": [{"from": "human", "value": "..."}, ..., {"from": "gpt", ...}]}`` (ms-swift's
  and LLaMA-Factory's ShareGPT; ``from`` is ``system``, ``human``/``user`` or ``gpt``/``assistant``)
- **alpaca** SFT: ``{"instruction": "...", "input": "..." (optional), "output": "..."}``
- **preference** pairs: ``{"prompt", "chosen", "rejected"}``, all strings, or all lists of messages (TRL's
  conversational preference format).
- **kto** unpaired rows: ``{"prompt", "completion", "label"}`` with a boolean label (desirable or not); prompt and
  completion are both strings or both message lists (TRL's unpaired preference format).
- **query** SFT (ms-swift's older form): ``{"system": "..." (optional), "history": [["q", "r"], ...] (optional),
  "query": "...", "response": "..."}``; the history pairs are earlier user/assistant turns.
- **swift_preference** pairs (ms-swift's DPO/ORPO/SimPO/CPO form): ``{"messages": [..., {"role": "assistant"}],
  "rejected_response": "..."}``; the last assistant message is the chosen reply. A ``query``/``response`` row with
  ``rejected_response`` is read the same way.
- **swift_kto** unpaired rows (ms-swift's KTO form): ``{"messages": [..., {"role": "assistant"}], "label": true}``;
  the last assistant message is the completion.

ms-swift rows come back in TRL's conversational shapes (``messages``; ``prompt``/``chosen``/``rejected``;
``prompt``/``completion``/``label``), so the trainers see one internal form whatever the file used.

The WHOLE file is parsed and validated before anything is returned, so training never starts on a partly bad file.
Problems raise one :class:`DataError` that lists every bad row (up to :data:`MAX_REPORTED`, then a count), each with
the file, the 1-based line and the field. Beyond each row on its own, the file as a whole must be one format and, for
TRL's preference and KTO forms, one prompt shape (all plain strings or all message lists): a mix passes row by row but
crashes ``datasets``/Arrow once training starts. Privacy rule: an error
message never contains a value from the data (no sample text, no keys the data chose), only where the problem is
and what is wrong, because error messages end up in logs and may be shown to the coordinator's operators.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMATS = ("chat", "sharegpt", "alpaca", "preference", "kto", "query", "swift_preference", "swift_kto")
SFT_FORMATS = ("chat", "sharegpt", "alpaca", "query")
PREFERENCE_FORMATS = ("preference", "swift_preference")
KTO_FORMATS = ("kto", "swift_kto")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names (ms-swift / LLaMA-Factory) and the chat role each one maps to.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
               type(None): "null"}


MAX_REPORTED = 20
"""How many bad rows a :class:`DataError` lists; the rest are counted ("and N more bad rows")."""


class DataError(ValueError):
    """A data file is unusable. The message names file, line and field of every bad row, and never echoes the data.

    The first problem is in :attr:`line` / :attr:`field` / :attr:`problem`; :attr:`problems` holds every reported one
    (the first included, in line order, at most :data:`MAX_REPORTED`), and :attr:`unreported` counts the bad rows
    beyond those. The message is one ``file:line: field 'f': problem`` line per reported row, then ``and N more bad
    rows in file`` when some were left out, so the location always comes first on its line.

    Attributes:
        path: The file.
        line: 1-based line number of the (first) offending row, or None for a whole-file problem (an empty file).
        field: Path of the offending field inside the row (``messages[2].role``), or None for the whole row.
        problem: What is wrong, in words.
        problems: ``(line, field, problem)`` for each reported row.
        unreported: Bad rows found but not listed.
    """

    def __init__(self, path: str | Path, line: int | None, field: str | None, problem: str,
                 more: tuple[tuple[int | None, str | None, str], ...] = (), unreported: int = 0) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        self.problems: tuple[tuple[int | None, str | None, str], ...] = ((line, field, problem), *more)
        self.unreported = unreported
        lines = [self._one(*p) for p in self.problems]
        if unreported:
            lines.append(f"and {unreported} more bad row{'s' if unreported != 1 else ''} in {self.path}")
        super().__init__("\n".join(lines))

    def _one(self, line: int | None, field: str | None, problem: str) -> str:
        where = self.path if line is None else f"{self.path}:{line}"
        what = problem if field is None else f"field '{field}': {problem}"
        return f"{where}: {what}"

    @property
    def bad_rows(self) -> int:
        """Bad rows found in all, listed or not."""
        return len(self.problems) + self.unreported

    def __reduce__(self) -> tuple[Any, ...]:
        # The default pickling passes only the message back to __init__; keep every attribute instead.
        return (DataError, (self.path, self.line, self.field, self.problem, self.problems[1:], self.unreported))


class _RowError(Exception):
    """Raised by the validators below; the loader adds the path and line."""

    def __init__(self, field: str | None, problem: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "unknown")


def detect_format(row: dict[str, Any]) -> str | None:
    """Guess a row's format from its keys: ``"swift_preference"``, ``"swift_kto"``, ``"chat"``, ``"sharegpt"``,
    ``"preference"``, ``"kto"``, ``"query"``, ``"alpaca"``, or None if none fits.

    Detection looks only at which format-defining keys are present; the validators then report what is missing or
    malformed, so a row with ``chosen`` but no ``prompt`` is reported as a preference row missing ``prompt``.
    """
    if "rejected_response" in row and ("messages" in row or "query" in row or "response" in row):
        return "swift_preference"
    if "messages" in row and "label" in row:
        return "swift_kto"
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "completion" in row or "label" in row:
        return "kto"
    if "query" in row or "response" in row:
        return "query"
    if "instruction" in row or "output" in row:
        return "alpaca"
    return None


def _string(row: dict[str, Any], key: str, field: str, *, required: bool = True, allow_empty: bool = False) -> str:
    if key not in row:
        if required:
            raise _RowError(field, "missing")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise _RowError(field, f"must be a string, got {_json_type(value)}")
    if not allow_empty and not value.strip():
        raise _RowError(field, "must not be empty")
    return value


def _messages(value: Any, field: str, *, last_role: str | None = None) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise _RowError(field, f"must be a list of messages, got {_json_type(value)}")
    if not value:
        raise _RowError(field, "must hold at least one message")
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise _RowError(where, f"must be an object, got {_json_type(msg)}")
        role = _string(msg, "role", f"{where}.role")
        if role not in ROLES:
            raise _RowError(f"{where}.role", f"must be one of {', '.join(ROLES)}")
        content = _string(msg, "content", f"{where}.content")
        out.append({"role": role, "content": content})
    if last_role is not None and out[-1]["role"] != last_role:
        raise _RowError(f"{field}[{len(out) - 1}].role", f"the last message must be from the {last_role}")
    return out


def _check_chat(row: dict[str, Any]) -> dict[str, Any]:
    if "messages" not in row:
        raise _RowError("messages", "missing")
    return {"messages": _messages(row["messages"], "messages", last_role="assistant")}


def _check_sharegpt(row: dict[str, Any]) -> dict[str, Any]:
    value = row["conversations"]
    if not isinstance(value, list):
        raise _RowError("conversations", f"must be a list of turns, got {_json_type(value)}")
    if not value:
        raise _RowError("conversations", "must hold at least one turn")
    out = []
    for i, turn in enumerate(value):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise _RowError(where, f"must be an object, got {_json_type(turn)}")
        speaker = _string(turn, "from", f"{where}.from")
        if speaker not in SHAREGPT_ROLES:
            raise _RowError(f"{where}.from", f"must be one of {', '.join(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": _string(turn, "value", f"{where}.value")})
    if out[-1]["role"] != "assistant":
        raise _RowError(f"conversations[{len(out) - 1}].from", "the last turn must be from gpt (the assistant)")
    return {"messages": out}


def _check_kto(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("prompt", "completion", "label"):
        if key not in row:
            raise _RowError(key, "missing")
    if not isinstance(row["label"], bool):
        raise _RowError("label", f"must be true or false, got {_json_type(row['label'])}")
    if isinstance(row["prompt"], list):
        return {"prompt": _messages(row["prompt"], "prompt"),
                "completion": _messages(row["completion"], "completion", last_role="assistant"),
                "label": row["label"]}
    if not isinstance(row["prompt"], str):
        raise _RowError("prompt", f"must be a string or a list of messages, got {_json_type(row['prompt'])}")
    return {"prompt": _string(row, "prompt", "prompt"), "completion": _string(row, "completion", "completion"),
            "label": row["label"]}


def _check_alpaca(row: dict[str, Any]) -> dict[str, Any]:
    return {"instruction": _string(row, "instruction", "instruction"),
            "input": _string(row, "input", "input", required=False, allow_empty=True),
            "output": _string(row, "output", "output")}


def _check_preference(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise _RowError(key, "missing")
    if isinstance(row["prompt"], list):  # conversational: the answers are assistant turns after the prompt
        return {"prompt": _messages(row["prompt"], "prompt"),
                "chosen": _messages(row["chosen"], "chosen", last_role="assistant"),
                "rejected": _messages(row["rejected"], "rejected", last_role="assistant")}
    if not isinstance(row["prompt"], str):
        raise _RowError("prompt", f"must be a string or a list of messages, got {_json_type(row['prompt'])}")
    # TRL needs all three in one shape: a string prompt takes string answers.
    return {key: _string(row, key, key) for key in ("prompt", "chosen", "rejected")}


def _check_query(row: dict[str, Any]) -> dict[str, Any]:
    out = []
    if "system" in row:
        out.append({"role": "system", "content": _string(row, "system", "system")})
    history = row.get("history", [])
    if not isinstance(history, list):
        raise _RowError("history", f"must be a list of [query, response] pairs, got {_json_type(history)}")
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise _RowError(f"history[{i}]", "must be a [query, response] pair")
        for j, role in enumerate(("user", "assistant")):
            if not isinstance(pair[j], str):
                raise _RowError(f"history[{i}][{j}]", f"must be a string, got {_json_type(pair[j])}")
            if not pair[j].strip():
                raise _RowError(f"history[{i}][{j}]", "must not be empty")
            out.append({"role": role, "content": pair[j]})
    out.append({"role": "user", "content": _string(row, "query", "query")})
    out.append({"role": "assistant", "content": _string(row, "response", "response")})
    return {"messages": out}


def _swift_conversation(row: dict[str, Any]) -> list[dict[str, str]]:
    """An ms-swift row's conversation, ending in its (chosen) assistant reply, with at least one turn before it."""
    if "messages" in row:
        messages = _messages(row["messages"], "messages", last_role="assistant")
        if len(messages) < 2:
            raise _RowError("messages", "must hold a prompt before the last assistant message")
        return messages
    return _check_query(row)["messages"]


def _check_swift_preference(row: dict[str, Any]) -> dict[str, Any]:
    messages = _swift_conversation(row)
    rejected = _string(row, "rejected_response", "rejected_response")
    return {"prompt": messages[:-1], "chosen": messages[-1:], "rejected": [{"role": "assistant", "content": rejected}]}


def _check_swift_kto(row: dict[str, Any]) -> dict[str, Any]:
    messages = _swift_conversation(row)
    if not isinstance(row["label"], bool):
        raise _RowError("label", f"must be true or false, got {_json_type(row['label'])}")
    return {"prompt": messages[:-1], "completion": messages[-1:], "label": row["label"]}


_CHECKS = {"chat": _check_chat, "sharegpt": _check_sharegpt, "alpaca": _check_alpaca,
           "preference": _check_preference, "kto": _check_kto, "query": _check_query,
           "swift_preference": _check_swift_preference, "swift_kto": _check_swift_kto}


def _kinds(formats: tuple[str, ...]) -> tuple[str, ...]:
    # ms-swift's preference and KTO forms are the same kinds of row as TRL's; name the kind, once.
    return tuple(dict.fromkeys({"swift_preference": "preference", "swift_kto": "kto"}.get(f, f) for f in formats))


def _one_of(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _parse_line(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8").rstrip("\r\n")  # else a cut-off row's error points at "column 1" past its end
    except UnicodeDecodeError as e:  # str(e) would quote the offending byte
        raise _RowError(None, f"not valid UTF-8 (at byte {e.start + 1})") from None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:  # e.msg never quotes the document; str(e) is safe too but longer
        raise _RowError(None, f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(row, dict):
        raise _RowError(None, f"must be a JSON object, got {_json_type(row)}")
    return row


def _prompt_shape(row: dict[str, Any]) -> str:
    return "a list of messages" if isinstance(row["prompt"], list) else "a plain string"


def _shape_problems(rows: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, str | None, str]]:
    """Rows whose prompt shape differs from the file's majority (plain strings vs message lists).

    Each row may be either shape, but TRL and Arrow need one shape per file: ``Dataset.from_list`` fails with an
    ``ArrowTypeError`` on a column that holds both strings and lists, once training has started. The majority shape
    is taken as meant (the first row's on a tie), so the minority rows are the ones listed.
    """
    shapes: dict[str, list[int]] = {}
    for line_no, row in rows:
        shapes.setdefault(_prompt_shape(row), []).append(line_no)
    if len(shapes) < 2:
        return []
    (meant, lines), (odd, odd_lines) = sorted(shapes.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
    return [(n, "prompt", f"is {odd}, but {len(lines)} other rows (first: line {lines[0]}) hold {meant}; every row "
                          f"of a file must use one shape") for n in odd_lines]


def _load_rows(path: str | Path, fmt: str, allowed: tuple[str, ...]) -> tuple[str, list[dict[str, Any]]]:
    if fmt != "auto" and fmt not in allowed:
        raise ValueError(f"fmt must be 'auto' or one of {', '.join(allowed)}, got {fmt!r}")
    path = Path(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[tuple[int | None, str | None, str]] = []
    file_fmt = None if fmt == "auto" else fmt
    first_line = 0
    # Every line is checked, and every bad row reported (up to MAX_REPORTED listed), so an operator fixes the file
    # in one pass rather than one error per attempt.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = _parse_line(raw)
                row_fmt = detect_format(row)
                if file_fmt is None:
                    if row_fmt is None:
                        raise _RowError(None, "matches no known format (expected 'messages'; 'conversations'; "
                                              "'instruction' and 'output'; 'query' and 'response'; 'prompt', "
                                              "'chosen' and 'rejected'; or 'prompt', 'completion' and 'label')")
                    if row_fmt not in allowed:
                        raise _RowError(None, f"is a {row_fmt} row, expected {_one_of(_kinds(allowed))} rows")
                    file_fmt, first_line = row_fmt, line_no
                elif fmt == "auto" and row_fmt != file_fmt:
                    raise _RowError(None, f"is not a {file_fmt} row like line {first_line}; a file holds one format")
                rows.append((line_no, _CHECKS[file_fmt](row)))
            except _RowError as e:
                problems.append((line_no, e.field, e.problem))
    if file_fmt in ("preference", "kto"):  # TRL's forms take either shape per row; the ms-swift forms are all lists
        problems.extend(_shape_problems(rows))
    if problems:
        problems.sort(key=lambda p: p[0] or 0)
        shown = problems[:MAX_REPORTED]
        raise DataError(path, *shown[0], more=tuple(shown[1:]), unreported=len(problems) - len(shown))
    if file_fmt is None or not rows:
        raise DataError(path, None, None, "file holds no rows")
    return file_fmt, [row for _, row in rows]


def load_jsonl(path: str | Path, fmt: str = "auto") -> list[dict[str, Any]]:
    """Parse and validate a whole jsonl file; return its rows in their own format, with only the known fields.

    Blank lines are skipped but still counted, so line numbers match an editor's.

    Args:
        path: The jsonl file.
        fmt: One of :data:`FORMATS`, or ``"auto"`` to detect it from the first row. Every row of a file must have
            the same format.

    Returns:
        The validated rows. Message lists keep only ``role`` and ``content``; alpaca rows always have ``input``;
        sharegpt and query rows come back as chat rows ``{"messages": [...]}``, ms-swift preference and KTO rows as
        conversational ``prompt``/``chosen``/``rejected`` and ``prompt``/``completion``/``label`` rows.

    Raises:
        DataError: Listing every bad row (up to :data:`MAX_REPORTED`, then a count); nothing is returned for a file
            with any bad row.
        OSError: If the file cannot be read.
        ValueError: If ``fmt`` is not a known format.
    """
    return _load_rows(path, fmt, FORMATS)[1]


def _alpaca_to_chat(row: dict[str, str]) -> dict[str, Any]:
    user = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}


def load_sft(path: str | Path) -> list[dict[str, Any]]:
    """Load a chat, ShareGPT, alpaca or ms-swift query/response SFT file as TRL conversational rows
    ``{"messages": [...]}``.

    An alpaca row becomes a user turn (the instruction, then a blank line and the input if there is one) and an
    assistant turn (the output).

    Raises:
        DataError: For any bad row, or a file of preference pairs.
    """
    file_fmt, rows = _load_rows(path, "auto", SFT_FORMATS)
    return [_alpaca_to_chat(r) for r in rows] if file_fmt == "alpaca" else rows


def load_preference(path: str | Path) -> list[dict[str, Any]]:
    """Load a preference file (TRL's or ms-swift's form) as TRL rows ``{"prompt", "chosen", "rejected"}`` (strings
    or message lists).

    Raises:
        DataError: For any bad row, or a file of SFT rows.
    """
    return _load_rows(path, "auto", PREFERENCE_FORMATS)[1]


def load_kto(path: str | Path) -> list[dict[str, Any]]:
    """Load a KTO file (TRL's or ms-swift's form) as TRL unpaired rows ``{"prompt", "completion", "label"}``
    (strings or message lists).

    Raises:
        DataError: For any bad row, or a file of another format.
    """
    return _load_rows(path, "auto", KTO_FORMATS)[1]


def load_for_mode(path: str | Path, mode: str) -> list[dict[str, Any]]:
    """Load a training file in the format ``mode`` trains on: SFT rows for sft/qlora, KTO rows for kto, and
    preference pairs for dpo/orpo/simpo.

    Raises:
        DataError: For any bad row, or a file in another format than the mode needs.
        ValueError: An unknown mode.
    """
    if mode in ("sft", "qlora"):
        return load_sft(path)
    if mode == "kto":
        return load_kto(path)
    if mode in ("dpo", "orpo", "simpo"):
        return load_preference(path)
    raise ValueError(f"unknown training mode {mode!r}")
