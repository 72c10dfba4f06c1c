"""ShareGPT and KTO files: they load as TRL rows, and a bad line names file, line and field without its text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from site_agent.training.data import DataError, detect_format, load_for_mode, load_jsonl, load_kto, load_sft

SECRET = "Patient 4471 Jane Roe diagnosed"


def write(path: Path, *rows: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def sharegpt(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"from": f, "value": v} for f, v in turns]}


GOOD_SHAREGPT = sharegpt(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello."))
GOOD_KTO = {"prompt": "What is 2+2?", "completion": "Four.", "label": True}


def test_sharegpt_loads_as_chat_messages(tmp_path: Path) -> None:
    # Prepare
    path = write(tmp_path / "s.jsonl", GOOD_SHAREGPT, "", sharegpt(("user", "Q"), ("assistant", "A")))

    # Execute
    rows = load_sft(path)

    # Assert
    assert rows == [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    assert detect_format(GOOD_SHAREGPT) == "sharegpt" and load_for_mode(path, "qlora") == rows


def test_kto_loads_strings_and_conversations(tmp_path: Path) -> None:
    # Prepare
    conv = {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}],
            "label": False, "extra": 1}
    strings = write(tmp_path / "k.jsonl", GOOD_KTO)
    convs = write(tmp_path / "c.jsonl", conv)

    # Execute / Assert
    assert load_kto(strings) == [GOOD_KTO] and load_for_mode(strings, "kto") == [GOOD_KTO]
    assert load_kto(convs) == [{k: v for k, v in conv.items() if k != "extra"}]
    assert load_jsonl(strings, fmt="kto") == [GOOD_KTO]


@pytest.mark.parametrize(("bad", "field", "problem"), [
    ({"conversations": SECRET}, "conversations", "must be a list of turns, got string"),
    ({"conversations": []}, "conversations", "must hold at least one turn"),
    ({"conversations": [SECRET]}, "conversations[0]", "must be an object, got string"),
    (sharegpt(("human", SECRET), ("bot", SECRET)), "conversations[1].from",
     "must be one of system, human, user, gpt, assistant"),
    ({"conversations": [{"from": "human", "value": SECRET}, {"from": "gpt"}]}, "conversations[1].value", "missing"),
    (sharegpt(("human", SECRET), ("gpt", "   ")), "conversations[1].value", "must not be empty"),
    (sharegpt(("gpt", SECRET), ("human", SECRET)), "conversations[1].from",
     "the last turn must be from gpt (the assistant)"),
])
def test_bad_sharegpt_line_names_line_and_field(tmp_path: Path, bad: dict, field: str, problem: str) -> None:
    # Prepare: the bad row is on line 3 after a good row and a blank line
    path = write(tmp_path / "bad.jsonl", GOOD_SHAREGPT, "", bad)

    # Execute
    with pytest.raises(DataError) as err:
        load_sft(path)

    # Assert
    assert (err.value.path, err.value.line, err.value.field, err.value.problem) == (str(path), 3, field, problem)
    assert SECRET not in str(err.value) and str(err.value).startswith(f"{path}:3: field '{field}'")


@pytest.mark.parametrize(("bad", "field", "problem"), [
    ({"prompt": SECRET, "completion": SECRET}, "label", "missing"),
    ({"prompt": SECRET, "label": True}, "completion", "missing"),
    ({"completion": SECRET, "label": True}, "prompt", "missing"),
    ({"prompt": SECRET, "completion": SECRET, "label": "yes"}, "label", "must be true or false, got string"),
    ({"prompt": SECRET, "completion": SECRET, "label": 1}, "label", "must be true or false, got number"),
    ({"prompt": SECRET, "completion": 3, "label": True}, "completion", "must be a string, got number"),
    ({"prompt": 5, "completion": SECRET, "label": True}, "prompt",
     "must be a string or a list of messages, got number"),
    ({"prompt": [{"role": "user", "content": SECRET}], "completion": [{"role": "user", "content": SECRET}],
      "label": True}, "completion[0].role", "the last message must be from the assistant"),
])
def test_bad_kto_line_names_line_and_field(tmp_path: Path, bad: dict, field: str, problem: str) -> None:
    # Prepare
    path = write(tmp_path / "bad.jsonl", GOOD_KTO, GOOD_KTO, bad)

    # Execute
    with pytest.raises(DataError) as err:
        load_kto(path)

    # Assert
    assert (err.value.line, err.value.field, err.value.problem) == (3, field, problem)
    assert SECRET not in str(err.value)


def test_a_file_must_match_the_mode(tmp_path: Path) -> None:
    # Prepare
    kto = write(tmp_path / "k.jsonl", GOOD_KTO)
    pairs = write(tmp_path / "p.jsonl", {"prompt": SECRET, "chosen": SECRET, "rejected": SECRET})
    mixed = write(tmp_path / "m.jsonl", GOOD_SHAREGPT, GOOD_KTO)

    # Execute / Assert
    with pytest.raises(DataError, match=r"k\.jsonl:1: is a kto row, expected preference rows"):
        load_for_mode(kto, "dpo")
    with pytest.raises(DataError, match=r"p\.jsonl:1: is a preference row, expected kto rows"):
        load_for_mode(pairs, "kto")
    with pytest.raises(DataError, match=r"m\.jsonl:2: is not a sharegpt row like line 1"):
        load_jsonl(mixed)
    with pytest.raises(ValueError, match="unknown training mode"):
        load_for_mode(kto, "ppo")


# ms-swift's own forms: https://swift.readthedocs.io (custom dataset formats): messages + rejected_response for
# DPO/ORPO/SimPO/CPO, messages + label for KTO, and the older query/response/history/system rows.
SWIFT_MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]


def test_swift_query_response_history_loads_as_chat(tmp_path: Path) -> None:
    # Prepare
    path = write(tmp_path / "q.jsonl",
                 {"system": "Be brief.", "history": [["Q1", "A1"], ["Q2", "A2"]], "query": "Q3", "response": "A3"},
                 {"query": "Q", "response": "A"})

    # Execute
    rows = load_for_mode(path, "sft")

    # Assert
    assert rows == [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                      {"role": "assistant", "content": "A2"}, {"role": "user", "content": "Q3"},
                      {"role": "assistant", "content": "A3"}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    assert detect_format({"query": "Q", "response": "A"}) == "query"


def test_swift_preference_last_assistant_is_chosen(tmp_path: Path) -> None:
    # Prepare
    path = write(tmp_path / "p.jsonl", {"messages": SWIFT_MESSAGES, "rejected_response": "Go away."},
                 {"query": "Q", "response": "good", "rejected_response": "bad"})

    # Execute
    rows = load_for_mode(path, "dpo")

    # Assert
    assert rows == [
        {"prompt": SWIFT_MESSAGES[:2], "chosen": [SWIFT_MESSAGES[2]],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]}]
    assert load_for_mode(path, "orpo") == rows == load_for_mode(path, "simpo")


def test_swift_kto_messages_and_label(tmp_path: Path) -> None:
    # Prepare
    path = write(tmp_path / "k.jsonl", {"messages": SWIFT_MESSAGES, "label": False})

    # Execute
    rows = load_for_mode(path, "kto")

    # Assert
    assert rows == [{"prompt": SWIFT_MESSAGES[:2], "completion": [SWIFT_MESSAGES[2]], "label": False}]


@pytest.mark.parametrize(("loader", "bad", "field", "problem"), [
    (load_sft, {"query": SECRET}, "response", "missing"),
    (load_sft, {"query": SECRET, "response": 3}, "response", "must be a string, got number"),
    (load_sft, {"query": SECRET, "response": SECRET, "history": SECRET}, "history",
     "must be a list of [query, response] pairs, got string"),
    (load_sft, {"query": SECRET, "response": SECRET, "history": [[SECRET]]}, "history[0]",
     "must be a [query, response] pair"),
    (load_sft, {"query": SECRET, "response": SECRET, "history": [["ok", SECRET], [SECRET, 7]]}, "history[1][1]",
     "must be a string, got number"),
    (load_sft, {"query": SECRET, "response": SECRET, "system": " "}, "system", "must not be empty"),
    ("dpo", {"messages": SWIFT_MESSAGES, "rejected_response": 1}, "rejected_response", "must be a string, got number"),
    ("dpo", {"messages": SWIFT_MESSAGES[2:], "rejected_response": SECRET}, "messages",
     "must hold a prompt before the last assistant message"),
    ("dpo", {"messages": SWIFT_MESSAGES[:2], "rejected_response": SECRET}, "messages[1].role",
     "the last message must be from the assistant"),
    ("kto", {"messages": SWIFT_MESSAGES, "label": "yes"}, "label", "must be true or false, got string"),
])
def test_bad_swift_line_names_line_and_field(tmp_path: Path, loader: object, bad: dict, field: str,
                                             problem: str) -> None:
    # Prepare: line 1 is a good row of the same format, line 2 blank, the bad row on line 3
    good = {load_sft: {"query": "Q", "response": "A"}, "dpo": {"messages": SWIFT_MESSAGES, "rejected_response": "x"},
            "kto": {"messages": SWIFT_MESSAGES, "label": True}}[loader]  # type: ignore[index]
    path = write(tmp_path / "bad.jsonl", good, "", bad)

    # Execute
    with pytest.raises(DataError) as err:
        loader(path) if callable(loader) else load_for_mode(path, loader)  # type: ignore[arg-type]

    # Assert
    assert (err.value.path, err.value.line, err.value.field, err.value.problem) == (str(path), 3, field, problem)
    assert SECRET not in str(err.value) and str(err.value).startswith(f"{path}:3: field '{field}'")


def test_swift_rows_must_match_the_mode(tmp_path: Path) -> None:
    # Prepare
    pref = write(tmp_path / "p.jsonl", {"messages": SWIFT_MESSAGES, "rejected_response": "x"})
    kto = write(tmp_path / "k.jsonl", {"messages": SWIFT_MESSAGES, "label": True})

    # Execute / Assert
    with pytest.raises(DataError, match=r"p\.jsonl:1: is a swift_preference row, expected chat, sharegpt, alpaca or "
                                        r"query rows"):
        load_for_mode(pref, "sft")
    with pytest.raises(DataError, match=r"k\.jsonl:1: is a swift_kto row, expected preference rows"):
        load_for_mode(kto, "dpo")
