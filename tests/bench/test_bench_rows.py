"""Every bench's rows: a row with a goal computes ``meets_goal`` from its numbers (and can fail); an informational
row never says ``meets_goal: true``, it says null. Runs the row builders on made-up numbers, no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import aggregate, gpu_check, quality, report, round_overhead
from bench.report import INFORMATIONAL, Row


def _check(rows: list[Row]) -> None:
    """The schema rule, on the rows and on the JSON a bench writes from them."""
    assert rows
    for r in rows:
        if r.goal.startswith(INFORMATIONAL):
            assert r.meets_goal is None, r
        else:
            assert isinstance(r.meets_goal, bool), r


def test_a_row_without_a_goal_cannot_claim_to_meet_it() -> None:
    with pytest.raises(ValueError, match="informational"):
        Row("c", 1.0, 1.0, 1.0, "s", "informational", True)
    with pytest.raises(ValueError, match="informational"):
        Row("c", 1.0, 1.0, 1.0, "s", "informational (naive)", False)
    with pytest.raises(ValueError, match="computes meets_goal"):
        Row("c", 1.0, 1.0, 1.0, "s", ">= 0.5", None)


def test_the_json_says_null_for_informational_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "RESULTS", tmp_path)  # never overwrite a real results file
    import numpy as np

    path = report.write_results("rows", [Row("a", 1.0, 2.0, 0.5, "s", INFORMATIONAL, None),
                                         Row("b", 1.0, 2.0, 0.5, "s", ">= 0.6", np.float64(0.5) >= 0.6)])
    data = json.loads(path.read_text())["rows"]
    assert [r["meets_goal"] for r in data] == [None, False]  # a numpy bool is stored as a JSON bool


def _case(files_1t: float, memcpy: float = 10e9, flower: float | None = 2.0, pool: int = 10) -> aggregate.CaseTimes:
    return aggregate.CaseTimes("fedavg 8M N=10", read_bytes=10 * 2**25, files_1t=files_1t, files_2t=files_1t / 1.5,
                               tensors_1t=files_1t, plain_1t=files_1t * 1.2, flower=flower, memcpy_1t=memcpy,
                               memcpy_2t=memcpy * 1.3, mem_files=32.0, mem_flower=1000.0 if flower else None,
                               flat_goal="flat", flat=True, update_bytes=2**25, pool=pool)


@pytest.mark.parametrize(("files_1t", "meets"), [(0.05, True), (0.2, False)])
def test_aggregate_rows_only_the_bandwidth_goal_and_memory_can_pass_or_fail(files_1t: float, meets: bool) -> None:
    rows = aggregate.case_rows(_case(files_1t))
    _check(rows)
    goal = rows[0]
    assert goal.goal == ">= 0.5" and goal.meets_goal is meets
    assert goal.ratio == pytest.approx(10 * 2**25 / files_1t / 10e9)  # bytes read per second over memcpy's
    assert [r.case for r in rows if r.meets_goal is not None] == [rows[0].case, rows[-1].case]
    flower = [r for r in rows if r.case.endswith("(ratio: Flower / ours)")]
    assert len(flower) == 1 and flower[0].meets_goal is None  # Flower is a reference, not a goal any more
    _check(aggregate.case_rows(_case(files_1t, flower=None)))


def test_aggregate_goal_is_information_only_where_updates_repeat() -> None:
    """Fewer distinct updates than N: the blocked sum reads the repeats from cache, so the bandwidth row cannot
    pass a goal that is about memory (and says why)."""
    goal = aggregate.case_rows(_case(0.01, pool=4))[0]
    assert goal.meets_goal is None and goal.goal == INFORMATIONAL and "cache-assisted" in goal.case
    assert aggregate.case_rows(_case(0.01, pool=10))[0].meets_goal is True


def test_pool_is_distinct_up_to_n_where_memory_allows_and_beyond_the_cache() -> None:
    mib, gib = 1 << 20, 1 << 30
    size = aggregate.Size("8M", 8, 8, 3)
    assert aggregate.pool_for(size, 32 * mib, 504 * mib, 100, 24 * gib).pool == 100  # 3 x 100 x 32 MiB < 12 GiB
    assert aggregate.pool_for(size, 256 * mib, 504 * mib, 100, 24 * gib).pool == 16  # memory-bound: 16 x 3 x 256 MiB
    assert aggregate.pool_for(size, 32 * mib, 504 * mib, 10, 24 * gib).pool == 32  # twice the cache beyond N
    assert aggregate.pool_for(size, 32 * mib, 0, 4, 1 * gib).pool == 8  # never fewer than stated


def test_quality_rows() -> None:
    def result(m: str, final: float, errors: tuple[float, ...] = ()) -> quality.MethodResult:
        return quality.MethodResult(m, (2.0, final), {"site-a": final}, errors, 4, 100)

    cfg = quality.QualityConfig(sites=2, rounds=2, steps=2)
    results = {"centralized": result("centralized", 1.0), "centralized_seq": result("centralized_seq", 0.9),
               "fedavg": result("fedavg", 1.5, (0.3, 0.2)), "ffa_lora": result("ffa_lora", 1.01, (0.0, 0.0)),
               "fedex_lora": result("fedex_lora", 1.2, (0.0, 1e-3))}
    rows = quality.build_rows(results, cfg)
    _check(rows)
    assert any(r.meets_goal is False for r in rows) and any(r.meets_goal is True for r in rows)
    assert all(r.meets_goal is None for r in rows if r.case.startswith("fedavg"))  # naive FedAvg has no goal


def test_gpu_check_rows() -> None:
    ours = {"tokens": 1000.0, "seconds": 10.0, "peak_bytes": 100.0 * 2**20}
    rows = [*gpu_check.goal_rows("sft", "LoRA bf16", ours, {"seconds": 10.0, "peak_bytes": 100.0 * 2**20}),
            *gpu_check.info_rows("bf16", 2, 100.0, 80.0, 150.0)]
    _check(rows)
    assert [r.meets_goal for r in rows] == [True, True, None, None, None]


def test_round_overhead_counts_set_up_as_overhead() -> None:
    # The site's whole local round (3.0 s) includes 1.0 s of set-up around a 2.0 s training loop: that second is
    # overhead, so a round closing 2.05 s after it opened is on goal only when set-up is not counted as training.
    rounds = [round_overhead.RoundTimes(1, 9.0, {"a": 2.0, "b": 1.5}, {"a": 8.0, "b": 7.0}),
              round_overhead.RoundTimes(2, 2.05, {"a": 2.0, "b": 1.5}, {"a": 2.04, "b": 1.6}),
              round_overhead.RoundTimes(3, 3.2, {"a": 2.0, "b": 1.5}, {"a": 3.0, "b": 2.0})]
    rows, notes = round_overhead.build_rows(rounds)
    _check(rows)
    assert [r.meets_goal for r in rows] == [None, True, False, False]
    assert rows[2].ratio == pytest.approx(0.6) and rows[2].reference == pytest.approx(2.0)
    assert rows[-1].ratio == pytest.approx((0.025 + 0.6) / 2)
    assert "a 1.000 s" in notes[2]  # the site-side set-up of round 3, printed


def test_round_overhead_counts_the_step_between_rounds() -> None:
    # Round 2 opened 30 ms after round 1 closed: that step is part of round 2's cycle (close to close).
    walls = round_overhead.round_walls([(1_000, 4_000), (4_030, 6_500), (6_540, 9_000)])
    assert walls == [3.0, 2.5, 2.5]


@pytest.mark.parametrize(("up_s", "meets"), [(15.0, True), (17.0, False)])
def test_link_rows_put_the_goals_on_the_steady_round_and_the_cut(up_s: float, meets: bool) -> None:
    from bench import link

    mib80 = 80 << 20

    def rnd(r: int, up: float, down: float = 15.0) -> dict[str, object]:
        return {"round": r, "upload_bytes": mib80, "upload_s": up, "download_bytes": mib80, "download_s": down,
                "upload_ack_s": 0.5, "tensor_bytes": mib80}
    rounds = {1: rnd(1, 30.0, 30.0), 2: rnd(2, up_s), 3: rnd(3, up_s + link.CUT_S + 1.0)}
    raw = {m: [40e6, 45e6, 45e6] for m in ("up", "down")}
    rows = link.link_rows(rounds, raw, 3e9)
    _check(rows)
    goals = {r.case.split(",")[0] if "goodput" in r.case else "cut": r.meets_goal for r in rows
             if r.meets_goal is not None}
    # round 2 carries the goodput goals, the cut row its own; round 1's cold transfer is information only
    assert goals == {"upload goodput": meets, "download goodput": True, "cut": True}
    cut = next(r for r in rows if "cut" in r.case)
    assert cut.ratio == pytest.approx((up_s + link.CUT_S + 1.0) / (up_s + link.CUT_S))
