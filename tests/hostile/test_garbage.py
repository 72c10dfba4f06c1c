"""Garbage bodies to every method of every service: each gets a specific status (a body that is not the declared
message: INVALID_ARGUMENT), never UNKNOWN or INTERNAL, and the coordinator keeps serving with no traceback logged."""

from __future__ import annotations

import random

import grpc
import pytest
from attacker import assert_healthy
from conftest import Coordinator
from proto_client import Wire

SC = grpc.StatusCode
# A length-delimited field 1 that claims 2**35 bytes: no parser can read it as any message.
TRUNCATED = b"\x0a\xff\xff\xff\xff\x7f" + b"x" * 8
# An invalid varint (eleven continuation bytes) for field 1.
BAD_VARINT = b"\x08" + b"\xff" * 11
METHODS = [(svc, m) for svc in ("FederationService", "AdminService", "SecAggService")
           for m in ("Join", "FetchTask", "DownloadAdapter", "UploadUpdate", "GetUploadStatus", "ReportMetrics",
                     "Heartbeat", "ReportError", "ListSites", "GetStatus", "ListRounds", "ListEvaluations", "Start", "Pause",
                     "Resume", "Stop", "Publish", "WithdrawSite", "RevokeSite", "GetSettings", "AdvertiseKeys",
                     "GetRoster", "ShareKeys", "GetShares", "GetUnmaskRequest", "UnmaskShares", "SignSurvivors",
                     "GetSurvivorSignatures")]


def _raw_call(ch: grpc.Channel, wire: Wire, service: str, method: str, body: bytes) -> grpc.StatusCode:
    """Send ``body`` as the raw request bytes of ``service.method`` (its stream shape from the .proto)."""
    svc = wire.services[service]
    m = svc.methods_by_name[method]
    path = f"/{svc.full_name}/{method}"
    try:
        if m.client_streaming:
            ch.stream_unary(path)(iter([body]), timeout=10)
        elif m.server_streaming:
            for _ in ch.unary_stream(path)(body, timeout=10):
                pass
        else:
            ch.unary_unary(path)(body, timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return SC.OK


def _methods(wire: Wire) -> list[tuple[str, str]]:
    return [(s, m) for s, m in METHODS if m in wire.services[s].methods_by_name]


def test_every_method_is_covered(wire: Wire) -> None:
    assert {(s, m.name) for s, d in wire.services.items() for m in d.methods} == set(_methods(wire))


@pytest.mark.parametrize("body", [TRUNCATED, BAD_VARINT], ids=["truncated", "bad-varint"])
def test_unparseable_body_is_invalid_argument_on_every_method(coord: Coordinator, wire: Wire, body: bytes) -> None:
    # The admin certificate on AdminService: a parse failure must be refused before any admin action runs.
    site, admin = coord.channel(coord.site("site-a")), coord.channel(coord.admin)
    got = {f"{s}.{m}": _raw_call(admin if s == "AdminService" else site, wire, s, m, body) for s, m in _methods(wire)}
    assert got == {k: SC.INVALID_ARGUMENT for k in got}
    assert_healthy(coord, wire)
    assert "Traceback" not in coord.log_text()


def test_random_bytes_never_end_unknown(coord: Coordinator, wire: Wire) -> None:
    # Random bytes may happen to parse; then the call is refused (or served) for what it says, never UNKNOWN.
    # A site certificate throughout, so a random body that parses as an admin Stop is refused, not obeyed.
    rng = random.Random(1313)
    ch = coord.channel(coord.site("site-a"))
    bad = {}
    for s, m in _methods(wire):
        for _ in range(4):
            body = rng.randbytes(rng.randrange(1, 200))
            code = _raw_call(ch, wire, s, m, body)
            if code in (SC.UNKNOWN, SC.INTERNAL):
                bad[f"{s}.{m}"] = (code, body.hex())
    assert not bad
    assert_healthy(coord, wire)
    assert "Traceback" not in coord.log_text()


def test_uint64_of_2_63_or_more_is_out_of_range(coord: Coordinator, wire: Wire) -> None:
    stub = wire.stub(coord.channel(coord.site("site-a")), "FederationService")
    huge = (1 << 64) - 1
    calls = {"GetUploadStatus.round": (stub.GetUploadStatus, wire.msg["GetUploadStatusRequest"](round=huge,
                                                                                               payload_sha256="0" * 64)),
             "ReportMetrics.round": (stub.ReportMetrics, wire.msg["ReportMetricsRequest"](round=1 << 63, phase="t")),
             "ReportMetrics.num_examples": (stub.ReportMetrics, wire.msg["ReportMetricsRequest"](
                 round=1, phase="train", num_examples=huge)),
             "Heartbeat.round": (stub.Heartbeat, wire.msg["HeartbeatRequest"](round=huge)),
             "ReportError.round": (stub.ReportError, wire.msg["ReportErrorRequest"](round=huge, phase="train",
                                                                                    error_type="RuntimeError")),
             "DownloadAdapter.offset": (stub.DownloadAdapter, wire.msg["DownloadAdapterRequest"](round=1, offset=huge))}
    for name, (fn, req) in calls.items():
        with pytest.raises(grpc.RpcError) as e:
            out = fn(req, timeout=10)
            for _ in (out if name.startswith("DownloadAdapter") else ()):
                pass
        assert e.value.code() == SC.OUT_OF_RANGE, name
        assert name.split(".")[1] in e.value.details(), (name, e.value.details())
    assert_healthy(coord, wire)
