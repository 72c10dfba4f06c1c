"""The userspace link's jitter: each packet's one-way delay lies in delay +- jitter, and packets leave in the order
they came (jitter without reordering); without jitter the delay is fixed."""

from __future__ import annotations

import random

from bench.linkemu import Direction


def test_jitter_spreads_the_delay_and_keeps_the_order() -> None:
    d = Direction(rate_bps=0, delay_s=0.040, loss=0.0, queue_bytes=1 << 20, jitter_s=0.010)
    rng = random.Random(1)
    sent = [i * 0.001 for i in range(500)]
    for t in sent:
        d.offer(b"x" * 100, t, rng, cut=False)
    due = [at for at, _ in d.line]
    assert due == sorted(due)  # FIFO: no reordering
    delays = [at - t for at, t in zip(due, sent, strict=True)]
    assert all(0.030 - 1e-9 <= x <= 0.050 + 0.010 for x in delays)  # held behind a later-due packet at most
    assert max(delays) - min(delays) > 0.015  # and really spread


def test_no_jitter_is_a_fixed_delay() -> None:
    d = Direction(rate_bps=0, delay_s=0.040, loss=0.0, queue_bytes=1 << 20)
    for i in range(10):
        d.offer(b"x", i * 0.01, random.Random(0), cut=False)
    assert [round(at - i * 0.01, 9) for i, (at, _) in enumerate(d.line)] == [0.04] * 10
