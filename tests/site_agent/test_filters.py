"""Site egress filters: clip bounds the norm, the noise has the documented scale, and the order is clip -> noise."""

from __future__ import annotations

import math

import pytest
import torch

from site_agent.egress.filters import (
    ClipFilter,
    GaussianNoiseFilter,
    apply_filters,
    check_order,
    dp_filters,
)
from strategies.clipping import l2_norm


def _delta(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(4, 64, generator=g) * scale,
            "a.lora_B.weight": torch.randn(64, 4, generator=g) * scale}


@pytest.mark.parametrize("scale", [1e-3, 0.1, 10.0, 1e4])
def test_clip_bounds_the_whole_update_norm(scale: float) -> None:
    # Prepare
    delta = _delta(0, scale)
    before = {k: v.clone() for k, v in delta.items()}

    # Execute
    out = ClipFilter(1.5).apply(delta)

    # Assert: norm <= bound; an update within the bound is unchanged; a larger one keeps its direction; no mutation
    norm = l2_norm(delta)
    assert l2_norm(out) <= 1.5 * (1 + 1e-6)
    if norm <= 1.5:
        assert all(torch.equal(out[k], delta[k]) for k in delta)
    else:
        assert l2_norm(out) == pytest.approx(1.5, rel=1e-6)
        assert all(torch.allclose(out[k] * norm / 1.5, delta[k], rtol=1e-5) for k in delta)
    assert all(torch.equal(before[k], delta[k]) for k in delta)
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in delta.items()}


def test_clip_refuses_a_non_finite_update() -> None:
    delta = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ValueError, match="non-finite"):
        ClipFilter(1.0).apply(delta)


def test_noise_std_is_noise_multiplier_times_clip_norm() -> None:
    # Prepare: a zero update of 400k elements, sigma=0.5, C=3 -> std 1.5
    delta = {"x": torch.zeros(400, 500), "y": torch.zeros(200, 1000)}
    f = GaussianNoiseFilter(0.5, 3.0, torch.Generator().manual_seed(1))

    # Execute
    out = torch.cat([v.flatten().double() for v in f.apply(delta).values()])

    # Assert: std within 1% (its standard error is 1.5/sqrt(2 * 400k) ~ 0.0017), mean ~ 0, Gaussian tails
    assert f.std == 1.5
    assert out.std().item() == pytest.approx(1.5, rel=0.01)
    assert abs(out.mean().item()) < 0.01
    assert (out.abs() > 3 * 1.5).double().mean().item() == pytest.approx(0.0027, abs=0.0005)


def test_dp_pipeline_is_clip_then_noise() -> None:
    # Prepare: an update far above the bound
    delta = _delta(2, 100.0)

    # Execute
    filters = dp_filters(2.0, 1.0, torch.Generator().manual_seed(7))
    out = apply_filters(delta, filters)

    # Assert: exactly clip(delta) + noise from the same seed (noise added after the clip, not scaled by it)
    assert [f.name for f in filters] == ["clip", "gaussian_noise"]
    clipped = ClipFilter(1.0).apply(delta)
    zeros = {k: torch.zeros_like(v) for k, v in delta.items()}
    noise = GaussianNoiseFilter(2.0, 1.0, torch.Generator().manual_seed(7)).apply(zeros)
    for k in delta:
        assert torch.allclose(out[k], clipped[k] + noise[k], atol=1e-5)
    # The noise dominates: its norm is about sigma * C * sqrt(d), far above the bound C = 1.
    d = sum(v.numel() for v in delta.values())
    assert l2_norm(out) == pytest.approx(2.0 * math.sqrt(d), rel=0.1)


def test_noise_before_clip_is_refused() -> None:
    with pytest.raises(ValueError, match="order must be clip -> noise"):
        check_order([GaussianNoiseFilter(1.0, 1.0), ClipFilter(1.0)])
    with pytest.raises(ValueError, match="no earlier clip filter"):
        apply_filters({"w": torch.ones(3)}, [ClipFilter(2.0), GaussianNoiseFilter(1.0, 1.0)])  # clip looser than noise
    check_order([ClipFilter(1.0), GaussianNoiseFilter(1.0, 1.0)])


def test_no_noise_multiplier_gives_the_clip_alone() -> None:
    assert [f.name for f in dp_filters(0.0, 1.0)] == ["clip"]
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number > 0"):
        GaussianNoiseFilter(0.0, 1.0)


def test_cast_filter_rounds_to_the_wire_dtype_last() -> None:
    from site_agent.egress.filters import CastFilter

    delta = _delta(3, 0.5)
    out = apply_filters(delta, [ClipFilter(1.0), CastFilter.for_spec(["BF16", "BF16"])])
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    assert {v.dtype for v in delta.values()} == {torch.float32}  # the input is not modified
    clipped = ClipFilter(1.0).apply(delta)
    for k in delta:  # one rounding of the clipped float32 values, each within bf16's relative step
        assert torch.allclose(out[k].float(), clipped[k], rtol=2 ** -8, atol=0)
    assert CastFilter("F32").apply(delta)["a.lora_A.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="must be the last one"):
        check_order([CastFilter("BF16"), ClipFilter(1.0)])
    with pytest.raises(ValueError, match="one wire dtype"):
        CastFilter.for_spec(["F32", "BF16"])
    with pytest.raises(ValueError, match="wire dtype 'F16'"):
        CastFilter("F16")
