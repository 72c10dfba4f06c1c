"""A site that fails reports it to the coordinator (ReportError) with one sanitized line: the exception class and
the first line of its message, quoted text and paths removed, never the traceback or a sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_agent_modes import CANARY, _fake_client, _kit, _task, federation  # noqa: F401 - fixture

from site_agent import agent
from site_agent.client import MAX_ERROR_MESSAGE, error_summary
from site_agent.config import SiteConfig


def test_error_summary_keeps_the_class_and_drops_quotes_paths_and_lines() -> None:
    exc = ValueError("line 5 of /data/private/train.jsonl: field 'messages' holds \"Patient X\"\nTraceback: secret")
    assert error_summary(exc) == ("ValueError", "line 5 of <path>: field '…' holds '…'")
    name, line = error_summary(RuntimeError("C:\\Users\\ana\\notes.txt: " + "x" * 500))
    assert name == "RuntimeError" and line.startswith("<path>: xxx") and len(line) == MAX_ERROR_MESSAGE
    assert error_summary(KeyError("a secret key")) == ("KeyError", "'…'")
    assert error_summary(RuntimeError("bell\x07 and \x1b[2J escape")) == ("RuntimeError", "bell and [2J escape")


def test_a_site_whose_task_fails_on_its_data_reports_one_clean_line(tiny_model_dir: Path, federation, tmp_path: Path,  # type: ignore[no-untyped-def]  # noqa: F811
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: chat SFT data, a DPO task (the data does not suit it: the task fails at the site)
    init, blob, base_sha = federation
    rows = [{"messages": [{"role": "user", "content": CANARY}, {"role": "assistant", "content": "ok"}]}]
    cfg = SiteConfig(**{**_kit(tmp_path, rows).__dict__, "base_model": tiny_model_dir})
    reported: list[tuple[int, str, tuple[str, str]]] = []
    base = _fake_client(_task(init, base_sha, blob, "dpo"), blob, [])

    class Client(base):  # type: ignore[misc, valid-type]
        def report_error(self, round: int, phase: str, exc: BaseException) -> bool:
            reported.append((round, phase, error_summary(exc)))
            return True

    monkeypatch.setattr(agent, "CoordinatorClient", Client)

    # Execute
    with pytest.raises(agent.SiteRefusal):
        agent.run_site(cfg, show_progress=False)

    # Assert: one report, for round 1 while preparing it, naming the failure without the data or the path
    assert len(reported) == 1
    round, phase, (name, line) = reported[0]
    assert (round, phase, name) == (1, "prepare", "SiteRefusal") and "does not suit mode" in line
    assert CANARY not in line and str(tmp_path) not in line and "\n" not in line
    records = [json.loads(x) for x in (cfg.work_dir / "audit.jsonl").read_text().splitlines()]
    sent = [r["fields"] for r in records if r["event"] == "error_reported"]
    assert sent == [{"site": "s1", "round": 1, "phase": "prepare", "error": f"SiteRefusal: {line}"}]
