"""A reduced bench/load.py: 10 lightweight mTLS sites, one round, against a real coordinator process."""

from __future__ import annotations

from bench import load


def test_load_bench_runs_and_measures_every_upload() -> None:
    r = load.run(10, 1, workers=1, timeout=240)
    assert len(r.latencies) == 10 and all(0 < t < 120 for t in r.latencies)
    # Every upload's acknowledgement was timed from its last chunk, and it is part of the whole upload.
    assert len(r.ack_latencies) == 10 and all(0 < a < 120 for a in r.ack_latencies)
    assert sum(r.ack_latencies) < sum(r.latencies)
    assert r.payload_bytes > 1 << 20  # the tiny base's r=16 all-linear adapter
    assert r.peak_rss >= r.idle_rss > 0 and len(r.round_peaks) == 1 and r.round_peaks[0] > 0
    rows, notes = load.rows_for([r])
    assert {row.meets_goal for row in rows if row.goal == "informational"} == {None}
    assert any("p99" in row.case and row.meets_goal is not None for row in rows)
    assert str(r.payload_bytes) in notes[0]
