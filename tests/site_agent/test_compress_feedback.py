"""Site egress compression: the filter comes last (after DP noise), and the error-feedback residual store is
crash-safe (round r's residual never feeds a retry of round r; the one it was built on survives until r+1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedcommon import compress, tensors
from site_agent.egress.feedback import FeedbackStore
from site_agent.egress.filters import ClipFilter, CompressFilter, GaussianNoiseFilter, apply_filters, check_order


def _spec():
    state = {"a": torch.zeros(3, 40), "b": torch.zeros(5, 3)}
    return tensors.make_adapter_spec(state, 3, 6.0, 0.0, ["q_proj"], compress.compression("int8", 16))


def test_compression_must_come_after_the_noise() -> None:
    spec = _spec()
    noise = GaussianNoiseFilter(1.0, 1.0, torch.Generator().manual_seed(0))
    check_order([ClipFilter(1.0), noise, CompressFilter(spec)])
    with pytest.raises(ValueError, match="must be the last one"):
        check_order([ClipFilter(1.0), CompressFilter(spec), noise])


def test_compress_filter_adds_feedback_and_returns_its_residual() -> None:
    spec = _spec()
    g = torch.Generator().manual_seed(1)
    delta = {"a": torch.randn(3, 40, generator=g), "b": torch.randn(5, 3, generator=g)}
    prev = {k: torch.full_like(v, 0.01) for k, v in delta.items()}
    f = CompressFilter(spec, prev)
    enc = apply_filters(delta, [f])
    assert set(enc) == {"a.q", "a.absmax", "b.q", "b.absmax"}
    res = f.residual(delta, enc)
    sent = compress.decode(enc, spec)
    for k in delta:  # sent + residual == delta + previous residual
        assert torch.allclose(sent[k] + res[k], delta[k] + prev[k], atol=1e-6)


def test_feedback_store_is_keyed_and_crash_safe(tmp_path: Path) -> None:
    spec = _spec()
    store = FeedbackStore(tmp_path, "fed-1", spec.sha256)
    r1 = {"a": torch.ones(3, 40), "b": torch.ones(5, 3)}
    r2 = {k: v * 2 for k, v in r1.items()}
    assert store.load_before(1) == (0, None)
    store.save(1, r1)
    assert store.load_before(1) == (0, None)  # a retry of round 1 never applies round 1's own residual
    got_round, got = store.load_before(2)
    assert got_round == 1 and got is not None and torch.equal(got["a"], r1["a"])
    store.save(2, r2)  # killed after this write, before the upload: the retry of round 2 still finds round 1's
    got_round, got = store.load_before(2)
    assert got_round == 1 and got is not None and torch.equal(got["b"], r1["b"])
    store.save(3, r2)  # round 3 started from round 2's: round 1's is gone now
    assert [p.name[:11] for p in sorted(store.dir.iterdir())] == ["r0000000002", "r0000000003"]
    assert FeedbackStore(tmp_path, "fed-2", spec.sha256).load_before(9) == (0, None)  # another federation
    assert FeedbackStore(tmp_path, "fed-1", "0" * 64).load_before(9) == (0, None)  # another spec
    (store.dir / "r0000000003-" f"{spec.sha256[:16]}.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        store.load_before(4)



def test_egress_delta_compresses_with_feedback_carried_to_the_next_round(tmp_path: Path) -> None:
    # The one egress chain both transports (task loop, Flower ClientApp) call: noise -> compress, residual kept.
    from protos.fedbridge.v1 import federation_service_pb2 as pb
    from site_agent.agent import egress_delta
    from site_agent.egress.dp import DpSettings

    spec = _spec()
    g = torch.Generator().manual_seed(2)
    delta = {"a": torch.randn(3, 40, generator=g), "b": torch.randn(5, 3, generator=g)}
    task1 = pb.Task(federation_id="fed-1", round=1, adapter_spec=spec)
    sent1 = egress_delta(delta, DpSettings(), task1, tmp_path)
    _, residual = FeedbackStore(tmp_path, "fed-1", spec.sha256).load_before(2)
    assert residual is not None
    for k in delta:  # what left + what was kept back == the delta
        assert torch.allclose(compress.decode(sent1, spec)[k] + residual[k], delta[k], atol=1e-6)
    sent2 = egress_delta(delta, DpSettings(), pb.Task(federation_id="fed-1", round=2, adapter_spec=spec), tmp_path)
    want = apply_filters(delta, [CompressFilter(spec, residual)])
    assert all(torch.equal(sent2[k], want[k]) for k in want)  # round 2 sends delta + round 1's residual
