"""bench/compress.py's byte rows: computed from the encodings (never fixed), and the goals hold on the shapes."""

from __future__ import annotations

from bench import compress as bench


def test_byte_estimates_follow_the_layout_and_meet_the_goals() -> None:
    shapes = bench.llama8b_shapes()
    by = {m.name: m for m in bench.METHODS}
    fp32 = bench.estimated_bytes(shapes, by["fp32"])
    assert bench.estimated_bytes(shapes, by["bf16"]) * 2 == fp32
    assert bench.estimated_bytes(shapes, by["int8"]) / fp32 <= 0.26
    assert bench.estimated_bytes(shapes, by["int4"]) / fp32 <= 0.14
    assert bench.estimated_bytes(shapes, by["topk1%+int8"]) / fp32 <= 0.02


def test_real_payload_bytes_match_the_estimate_plus_a_header() -> None:
    shapes = {"m.lora_A.weight": (4, 300), "m.lora_B.weight": (300, 4)}
    for m in bench.METHODS:
        est, real = bench.estimated_bytes(shapes, m), bench.payload_bytes(shapes, m)
        assert est < real < est + 1024, (m.name, est, real)
