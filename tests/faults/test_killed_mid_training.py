"""A real site process SIGKILLed mid-round restarts, resumes the round from its last step checkpoint, and the
coordinator holds exactly one update from it for that round (issue 4, item 4). In the fault suite: "a site killed
mid-training". Not compared with the reference adapter: resuming from a step checkpoint is a different run from the
reference's uninterrupted one (one site, 40 steps); it asserts the resume, one update, and the round's aggregate
counting it once instead."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import faultkit

from coordinator.rounds.store import Store
from sandbox import localfed

STEPS, EVERY = 40, 5


def _wait_for_checkpoint(fed: localfed.LocalFederation, work_dir: Path, name: str, min_step: int,
                         timeout: float) -> None:
    """Wait until the site has a complete step checkpoint of round 1 at ``min_step`` or later (and still runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = work_dir.glob("checkpoints/round-1-*/checkpoint-*/trainer_state.json")
        if any(int(p.parent.name.rsplit("-", 1)[1]) >= min_step for p in done):
            return
        assert fed.procs[name].poll() is None, localfed._tail(fed.log_path(name))
        time.sleep(0.02)
    raise TimeoutError(f"no step checkpoint within {timeout}s:\n" + localfed._tail(fed.log_path(name)))


def _logged_steps(log: str) -> list[int]:
    """Steps of the site's ``[Site.train] ... step N/40 loss=`` progress lines (one every STEPS // 4 steps)."""
    return [int(n) for n in re.findall(rf"\[Site\.train\] .* step (\d+)/{STEPS} loss=", log)]


def test_sigkilled_site_resumes_its_round_and_sends_one_update(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: one site, one round of 40 steps with a checkpoint every 5
    fed = localfed.prepare(tmp_path / "fed", tiny_model_dir, n_sites=1, rounds=1, min_sites=1,
                           training={"max_steps": STEPS, "batch_size": 2, "learning_rate": 1e-3, "max_length": 64},
                           lora={"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
                           n_train=16, n_heldout=4)
    site = fed.sites[0]
    work_dir = fed.root / "sites" / site.name / "work"
    extra = {"checkpoint_steps": EVERY}
    with fed:
        fed.start_coordinator()
        first = fed.start_site(site, extra=extra)

        # Execute: SIGKILL the whole site process group once a checkpoint exists, then start the site again
        _wait_for_checkpoint(fed, work_dir, site.name, min_step=STEPS // 4, timeout=150)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        killed_log = fed.log_path(site.name).read_text(errors="replace")
        fed.start_site(site, extra=extra)
        codes = fed.wait([site.name, "coordinator"], timeout=200)

    # Assert
    assert first.returncode == -signal.SIGKILL
    assert codes == {site.name: 0, "coordinator": 0}, localfed._tail(fed.log_path(site.name))
    assert "[Site.UploadUpdate]" not in killed_log  # the kill really landed mid-round, before any upload
    ups = Store(fed.state_dir).updates(1)
    assert [u.site for u in ups] == [site.name]
    faultkit.assert_each_update_once(fed, expected=[(1, site.name)])
    restarted_log = fed.log_path(site.name).read_text(errors="replace")[len(killed_log):]
    resumed = re.findall(r"\[Site\.train\] round=1 resuming from step (\d+)", restarted_log)
    assert len(resumed) == 1 and STEPS // 4 <= int(resumed[0]) < STEPS and int(resumed[0]) % EVERY == 0, (
        restarted_log[-3000:])
    # The step count continues: the killed run logged step 10, the restarted one only steps after its checkpoint.
    assert STEPS // 4 in _logged_steps(killed_log)
    after = _logged_steps(restarted_log)
    assert after and min(after) > int(resumed[0]) and max(after) == STEPS, after
    assert not any(work_dir.glob("checkpoints/round-1-*/checkpoint-*"))  # the finished round cleaned up
