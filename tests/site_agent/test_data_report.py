"""Data errors list every bad row (up to a limit), catch what training would trip on, and read whole on a narrow
terminal through the real ``fedbridge-site check-data`` command."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from site_agent.training.data import MAX_REPORTED, DataError, load_for_mode, load_kto, load_preference, load_sft

ROOT = Path(__file__).resolve().parents[2]
SECRET = "Patient 4471 Jane Roe"
GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
BAD_ROLE = json.dumps({"messages": [{"role": "robot", "content": SECRET}, {"role": "assistant", "content": "a"}]})
KTO_PLAIN = {"prompt": "Q", "completion": "A", "label": True}
KTO_CONV = {"prompt": [{"role": "user", "content": SECRET}], "completion": [{"role": "assistant", "content": "A"}],
            "label": False}


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_every_bad_row_is_named_with_its_line_and_field(tmp_path: Path) -> None:
    # Prepare: bad rows on lines 2, 4 and 5 (a bad role, broken JSON, a missing field)
    path = write(tmp_path / "t.jsonl", GOOD, BAD_ROLE, GOOD, '{"messages": [', json.dumps({"messages": SECRET}))

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_sft(path)

    # Assert
    err = excinfo.value
    assert [(line, field) for line, field, _ in err.problems] == [(2, "messages[0].role"), (4, None), (5, "messages")]
    assert str(err).splitlines() == [
        f"{path}:2: field 'messages[0].role': must be one of system, user, assistant",
        f"{path}:4: invalid JSON: Expecting value at column 15",
        f"{path}:5: field 'messages': must be a list of messages, got string"]
    assert (err.line, err.field, err.unreported, err.bad_rows) == (2, "messages[0].role", 0, 3)
    assert "4471" not in str(err)


def test_past_the_limit_the_rest_are_counted(tmp_path: Path) -> None:
    # Prepare: 25 bad rows among good ones
    path = write(tmp_path / "t.jsonl", *([GOOD, BAD_ROLE] * 25))

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_sft(path)

    # Assert
    lines = str(excinfo.value).splitlines()
    assert len(lines) == MAX_REPORTED + 1
    assert [ln.split(":")[1] for ln in lines[:-1]] == [str(n) for n in range(2, 2 * MAX_REPORTED + 1, 2)]
    assert lines[-1] == f"and {25 - MAX_REPORTED} more bad rows in {path}"
    back = pickle.loads(pickle.dumps(excinfo.value))
    assert (back.problems, back.unreported, str(back)) == (excinfo.value.problems, 5, str(excinfo.value))


def test_kto_file_mixing_plain_and_conversational_prompts_is_refused_before_training(tmp_path: Path) -> None:
    """Each row is valid alone, but one Arrow column cannot hold strings and lists: name the odd rows out."""
    from datasets import Dataset

    # Prepare: three plain rows, two conversational ones
    rows = [KTO_PLAIN, KTO_CONV, KTO_PLAIN, KTO_CONV, KTO_PLAIN]
    path = write(tmp_path / "k.jsonl", *map(json.dumps, rows))
    with pytest.raises(Exception, match="Expected bytes") as arrow:  # what training hit on such a file
        Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "label")} for r in rows])
    assert type(arrow.value).__name__ == "ArrowTypeError"

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_kto(path)
    with pytest.raises(DataError) as as_mode:
        load_for_mode(path, "kto")

    # Assert
    err = excinfo.value
    assert [(line, field) for line, field, _ in err.problems] == [(2, "prompt"), (4, "prompt")]
    assert err.problem == ("is a list of messages, but 3 other rows (first: line 1) hold a plain string; every row of "
                           "a file must use one shape")
    assert str(as_mode.value) == str(err) and "4471" not in str(err)


def test_preference_file_mixing_shapes_names_the_minority(tmp_path: Path) -> None:
    # Prepare: one plain pair among two conversational ones (a tie would keep the first row's shape)
    conv = {"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "r"}]}
    path = write(tmp_path / "p.jsonl", json.dumps(conv), json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}),
                 json.dumps(conv))

    # Execute
    with pytest.raises(DataError) as excinfo:
        load_preference(path)

    # Assert
    assert excinfo.value.problems == ((2, "prompt", "is a plain string, but 2 other rows (first: line 1) hold a list "
                                                   "of messages; every row of a file must use one shape"),)


def _check_data(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "40", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "site_agent", "check-data", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


def test_check_data_cli_lists_every_bad_row_whole_in_a_narrow_terminal(tmp_path: Path) -> None:
    # Prepare: a long path, so a 40-column terminal would cut it if anything wrapped or truncated it
    deep = tmp_path / ("a-rather-long-folder-name-" * 3) / "train.jsonl"
    deep.parent.mkdir()
    path = write(deep, *map(json.dumps, [KTO_PLAIN, KTO_CONV, KTO_PLAIN]), "not json")
    good = write(tmp_path / "good.jsonl", GOOD, GOOD)

    # Execute
    bad = _check_data(str(path), "--mode", "kto")
    ok = _check_data(str(good))

    # Assert
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
    assert bad.stdout.splitlines() == [f"FAIL {path}: 2 bad rows",
                                       f"  {path}:2: field 'prompt': is a list of messages, but 2 other rows (first: "
                                       f"line 1) hold a plain string; every row of a file must use one shape",
                                       f"  {path}:4: invalid JSON: Expecting value at column 1"]
    assert "4471" not in bad.stdout + bad.stderr
    assert (ok.returncode, ok.stdout.strip()) == (0, f"OK {good}: 2 rows")
