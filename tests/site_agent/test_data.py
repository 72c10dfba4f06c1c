"""Site data loading: three formats, whole-file validation, exact error locations, and no data in errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from site_agent.training.data import DataError, detect_format, load_jsonl, load_preference, load_sft

# Distinctive text that must never show up in an error message.
SECRET = "Patient 4471 Jane Roe diagnosed"


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def chat(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


GOOD_CHAT = chat(("user", "What is 2+2?"), ("assistant", "Four."))


def test_chat_rows_load_as_messages_with_only_role_and_content(tmp_path: Path) -> None:
    # Prepare
    row = {"id": 7, "messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hi", "name": "x"},
                                 {"role": "assistant", "content": "Hello."}]}
    path = write(tmp_path / "t.jsonl", json.dumps(row), "", GOOD_CHAT)

    # Execute
    rows = load_sft(path)

    # Assert
    assert rows == [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "Hello."}]},
                    {"messages": [{"role": "user", "content": "What is 2+2?"},
                                  {"role": "assistant", "content": "Four."}]}]


def test_alpaca_rows_become_a_user_and_an_assistant_turn(tmp_path: Path) -> None:
    # Prepare
    path = write(tmp_path / "a.jsonl",
                 json.dumps({"instruction": "Translate.", "input": "bonjour", "output": "hello"}),
                 json.dumps({"instruction": "Say hi.", "output": "Hi!"}),
                 json.dumps({"instruction": "Say yo.", "input": "", "output": "Yo."}))

    # Execute
    rows = load_sft(path)

    # Assert
    assert rows == [
        {"messages": [{"role": "user", "content": "Translate.\n\nbonjour"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
        {"messages": [{"role": "user", "content": "Say yo."}, {"role": "assistant", "content": "Yo."}]},
    ]


def test_preference_rows_load_as_strings_or_conversations(tmp_path: Path) -> None:
    # Prepare
    conv = {"prompt": [{"role": "user", "content": "Sky colour?"}],
            "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": "Green."}]}
    plain = {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green.", "score": 1}
    plain_file = write(tmp_path / "p.jsonl", json.dumps(plain), json.dumps(plain))
    conv_file = write(tmp_path / "c.jsonl", json.dumps(conv))

    # Execute
    rows = load_preference(plain_file) + load_preference(conv_file)

    # Assert
    assert rows == [{"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."}] * 2 + [conv]


def test_detect_format_and_explicit_format(tmp_path: Path) -> None:
    # Execute / Assert
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"instruction": "x", "output": "y"}) == "alpaca"
    assert detect_format({"prompt": "p", "chosen": "c", "rejected": "r"}) == "preference"
    assert detect_format({"text": "plain"}) is None
    path = write(tmp_path / "a.jsonl", json.dumps({"instruction": "Say hi.", "output": "Hi!"}))
    assert load_jsonl(path, fmt="alpaca") == [{"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    with pytest.raises(DataError) as e:
        load_jsonl(path, fmt="chat")
    assert (e.value.line, e.value.field) == (1, "messages")


# Each case: the file's lines, then the expected (line, field) and a fragment of the problem. Every bad value is
# (or contains) SECRET, so the privacy assertion below is meaningful.
BAD_FILES = {
    "invalid JSON": ([GOOD_CHAT, '{"messages": [{"role": "user", "content": "' + SECRET + '"'], 2, None,
                     "invalid JSON"),
    "not an object": ([GOOD_CHAT, json.dumps([SECRET])], 2, None, "must be a JSON object, got array"),
    "missing field": ([json.dumps({"instruction": SECRET}), GOOD_CHAT], 1, "output", "missing"),
    "missing content": ([json.dumps({"messages": [{"role": "user", "contents": SECRET}, {"role": "assistant"}]})],
                        1, "messages[0].content", "missing"),
    "mixed formats": ([GOOD_CHAT, "", json.dumps({"instruction": SECRET, "output": SECRET})], 3, None,
                      "is not a chat row like line 1"),
    "wrong type": ([json.dumps({"messages": {"role": "user", "content": SECRET}})], 1, "messages",
                   "must be a list of messages, got object"),
    "content wrong type": ([json.dumps({"messages": [{"role": "user", "content": [SECRET]},
                                                     {"role": "assistant", "content": "ok"}]})],
                           1, "messages[0].content", "must be a string, got array"),
    "empty content": ([GOOD_CHAT, GOOD_CHAT, chat(("user", SECRET), ("assistant", "  "))], 3,
                      "messages[1].content", "must not be empty"),
    "unknown role": ([GOOD_CHAT] * 6 + [chat(("user", "q"), ("assistant", "a"), (SECRET, "x"))], 7,
                     "messages[2].role", "must be one of system, user, assistant"),
    "no final assistant turn": ([chat(("user", SECRET), ("assistant", "a"), ("user", SECRET))], 1,
                                "messages[2].role", "the last message must be from the assistant"),
    "no known format": ([json.dumps({SECRET: SECRET})], 1, None, "matches no known format"),
    "not UTF-8": (['{"messages": "\udcff"}'], 1, None, "not valid UTF-8"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_rows_raise_with_exact_line_and_field_and_no_data(name: str, tmp_path: Path) -> None:
    # Prepare
    lines, line, field, problem = BAD_FILES[name]
    path = tmp_path / "train.jsonl"
    path.write_bytes("".join(x + "\n" for x in lines).encode("utf-8", "surrogateescape"))

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_sft(path)

    # Assert
    err = excinfo.value
    assert isinstance(err, ValueError)
    assert (err.path, err.line, err.field) == (str(path), line, field)
    assert problem in err.problem
    where = f"{path}:{line}: " + (f"field '{field}': " if field else "")
    assert str(err).startswith(where)
    for text in (str(err), repr(err), repr(err.args)):
        assert "4471" not in text and "Jane" not in text and "Roe" not in text


def test_error_message_reads_file_line_field_problem(tmp_path: Path) -> None:
    # Prepare
    path = write(tmp_path / "train.jsonl", *([GOOD_CHAT] * 6), chat(("user", "q"), ("tool", "x"),
                                                                     ("assistant", "a")))

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_sft(path)

    # Assert
    assert str(excinfo.value) == f"{path}:7: field 'messages[1].role': must be one of system, user, assistant"


GOOD_PAIR = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})


@pytest.mark.parametrize("lines, line, field, problem", [
    ([GOOD_PAIR, json.dumps({"prompt": SECRET, "chosen": SECRET})], 2, "rejected", "missing"),
    ([json.dumps({"prompt": [{"role": "user", "content": SECRET}], "chosen": SECRET, "rejected": SECRET})],
     1, "chosen", "must be a list of messages, got string"),
    ([json.dumps({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "c"}],
                  "rejected": [{"role": "user", "content": SECRET}]})],
     1, "rejected[0].role", "the last message must be from the assistant"),
    ([GOOD_PAIR, GOOD_PAIR, json.dumps({"prompt": 4471, "chosen": SECRET, "rejected": SECRET})],
     3, "prompt", "must be a string or a list of messages, got number"),
])
def test_preference_errors_name_the_field(lines: list[str], line: int, field: str, problem: str,
                                          tmp_path: Path) -> None:
    # Prepare
    path = write(tmp_path / "pref.jsonl", *lines)

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_preference(path)

    # Assert
    assert (excinfo.value.line, excinfo.value.field, excinfo.value.problem) == (line, field, problem)
    assert "4471" not in str(excinfo.value) and "Jane" not in str(excinfo.value)


def test_file_bad_only_on_its_last_line_returns_nothing(tmp_path: Path) -> None:
    # Prepare: 99 good rows, then a truncated one (a crash while writing)
    path = write(tmp_path / "train.jsonl", *([GOOD_CHAT] * 99), GOOD_CHAT[:-5])
    result = None

    # Execute
    with pytest.raises(DataError) as excinfo:
        result = load_sft(path)

    # Assert
    assert excinfo.value.line == 100
    assert result is None


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    # Prepare
    path = write(tmp_path / "train.jsonl", "", GOOD_CHAT, "   ", "", "[1]")

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_sft(path)

    # Assert
    assert excinfo.value.line == 5


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_empty_file_is_an_error(lines: list[str], tmp_path: Path) -> None:
    # Prepare
    path = write(tmp_path / "train.jsonl", *lines)

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_sft(path)

    # Assert
    assert excinfo.value.line is None and excinfo.value.field is None
    assert str(excinfo.value) == f"{path}: file holds no rows"


def test_format_mismatch_with_the_loader_is_an_error(tmp_path: Path) -> None:
    # Prepare
    sft = write(tmp_path / "sft.jsonl", GOOD_CHAT)
    pref = write(tmp_path / "pref.jsonl", json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}))

    # Execute
    with pytest.raises(DataError) as sft_as_pref:
        load_preference(sft)
    with pytest.raises(DataError) as pref_as_sft:
        load_sft(pref)

    # Assert
    assert (sft_as_pref.value.line, sft_as_pref.value.problem) == (1, "is a chat row, expected preference rows")
    want = "is a preference row, expected chat, sharegpt, alpaca or query rows"
    assert (pref_as_sft.value.line, pref_as_sft.value.problem) == (1, want)


def test_data_error_survives_pickling() -> None:
    # Prepare
    err = DataError("d.jsonl", 3, "messages", "missing")

    # Execute
    back = pickle.loads(pickle.dumps(err))

    # Assert
    assert (back.path, back.line, back.field, back.problem, str(back)) == (
        "d.jsonl", 3, "messages", "missing", "d.jsonl:3: field 'messages': missing")
