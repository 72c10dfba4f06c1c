"""bench/gpu_check on a machine without CUDA says so and exits 0; its goal rows fail when a goal is missed."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_check


def test_without_cuda_it_skips_and_exits_0(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main() == 0
    assert "SKIPPED" in capsys.readouterr().out


@pytest.mark.parametrize(("seconds", "peak", "meets"), [((10.0, 10.0), (100.0, 100.0), (True, True)),
                                                        ((10.0, 9.0), (100.0, 100.0), (False, True)),
                                                        ((10.0, 10.0), (106.0, 100.0), (True, False))])
def test_goal_rows_can_fail(seconds: tuple[float, float], peak: tuple[float, float], meets: tuple[bool, bool]) -> None:
    ours = {"tokens": 1000.0, "seconds": seconds[0], "peak_bytes": peak[0] * 2**20}
    ref = {"seconds": seconds[1], "peak_bytes": peak[1] * 2**20}
    tps, mem = gpu_check.goal_rows("sft", "LoRA bf16", ours, ref)
    assert (tps.meets_goal, mem.meets_goal) == meets
    assert tps.goal == "ratio >= 0.95" and mem.goal == "ratio <= 1.05"
    assert mem.ours == pytest.approx(peak[0]) and tps.ratio == pytest.approx(seconds[1] / seconds[0])
