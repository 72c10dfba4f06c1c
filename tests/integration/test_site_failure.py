"""A site that dies is noticed (issue 14, item 2), with real processes on loopback: a site whose training fails
reports it (one sanitized line) and the round closes with the site that answered; a SIGKILLed site, which cannot
report, is marked silent within the heartbeat timeout and the round closes without it too."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from coordinator.rounds.store import Store
from sandbox import localfed
from site_agent.agent import FAIL_ENV

TRAINING = {"max_steps": 6, "batch_size": 2, "learning_rate": 3e-3, "max_length": 64}
LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


def _audit(fed: localfed.LocalFederation, event: str) -> list[dict]:
    path = fed.state_dir / "audit.jsonl"
    if not path.exists():
        return []
    return [r["fields"] for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def _wait(cond, what: str, fed: localfed.LocalFederation, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout}s:\n" + localfed._tail(fed.log_path("coordinator")))
        time.sleep(0.05)


def test_a_site_whose_training_fails_reports_it_and_the_round_closes(tiny_model_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fed = localfed.prepare(tmp_path / "fed", tiny_model_dir, n_sites=2, rounds=1, min_sites=2, federation_id="fail",
                           training=TRAINING, lora=LORA, n_train=8, n_heldout=2, quorum={"min_at_deadline": 1})
    with fed:
        fed.start_coordinator()
        fed.start_site(fed.sites[0])
        monkeypatch.setenv(FAIL_ENV, "1")  # site-b's training fails at its first step
        fed.start_site(fed.sites[1])
        monkeypatch.delenv(FAIL_ENV)
        codes = fed.wait(["site-b"], timeout=180)  # bounds only: seconds on a quiet machine
        _wait(lambda: bool(_audit(fed, "round_closed")), "round 1 closed", fed, 120)
    assert codes["site-b"] != 0
    failed = _audit(fed, "site_failed")
    assert [(f["site"], f["phase"]) for f in failed] == [("site-b", "train")]
    assert failed[0]["error"] == "RuntimeError: injected training failure at step 1 reading <path> row '…'"
    store = Store(fed.state_dir)
    try:
        closes = [e for e in store.events(1) if e["event"] == "all_remaining_answered"]
        assert closes and closes[0]["detail"]["sites"] == ["site-a"] and closes[0]["detail"]["failed"] == ["site-b"]
    finally:
        store.close()
    # nothing of the site's data or paths reached the coordinator
    for text in (fed.log_path("coordinator").read_text(), (fed.state_dir / "audit.jsonl").read_text()):
        assert "patient" not in text and "/data/private" not in text


def test_a_killed_site_is_marked_silent_within_the_heartbeat_timeout(tiny_model_dir: Path, tmp_path: Path) -> None:
    timeout_s = 4.0
    fed = localfed.prepare(tmp_path / "fed", tiny_model_dir, n_sites=2, rounds=1, min_sites=2, federation_id="kill",
                           training={**TRAINING, "max_steps": 40}, lora=LORA, n_train=8, n_heldout=2,
                           quorum={"min_at_deadline": 1, "heartbeat_timeout_s": timeout_s})
    b_log = fed.log_path("site-b")
    with fed:
        fed.start_coordinator()
        for s in fed.sites:
            fed.start_site(s)
        _wait(lambda: b_log.exists() and "site-b round 1/1 step " in b_log.read_text(errors="replace"),
              "site-b training", fed, 180)
        os.killpg(fed.procs["site-b"].pid, signal.SIGKILL)
        killed = time.monotonic()
        _wait(lambda: any(f["site"] == "site-b" for f in _audit(fed, "site_silent")), "site-b silent", fed, 3 * timeout_s)
        seen_after = time.monotonic() - killed
        _wait(lambda: bool(_audit(fed, "round_closed")), "round 1 closed", fed, 120)
    assert seen_after < timeout_s + 3
    assert [f["site"] for f in _audit(fed, "site_silent")] == ["site-b"]
