"""A refusal that carries the coordinator's retry pause (its disk is full) is retried after that pause, for unary
calls and for uploads (which resume at the offset the coordinator holds); one without it is not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

import site_agent.client as client_mod
from coordinator.trust.pki import create_dev_pki
from protos import codec
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent.client import CoordinatorClient, retry_after_s
from site_agent.config import SiteConfig, SiteData, SiteTls


class _Exhausted(grpc.RpcError):
    def __init__(self, pushback: str | None) -> None:
        self.pushback = pushback

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self) -> str:
        return "coordinator storage is full; nothing of this call was accepted; retry later"

    def trailing_metadata(self) -> Any:
        return ((codec.RETRY_AFTER_MS_KEY, self.pushback),) if self.pushback is not None else ()


def _client(tmp_path: Path) -> CoordinatorClient:
    kit = create_dev_pki(tmp_path / "pki", ["site-a"]).sites["site-a"]
    cfg = SiteConfig(name="site-a", coordinator="127.0.0.1:1", base_model=tmp_path, work_dir=tmp_path,
                     tls=SiteTls(kit.ca, kit.cert, kit.key, kit.signing_key), data=SiteData(tmp_path / "t.jsonl"),
                     retry_for_s=60)
    return CoordinatorClient(cfg)


class _FullDisk:
    """Refuses ``refusals`` upload streams for a full disk after taking 2 of the 4 bytes, then accepts."""

    def __init__(self, refusals: int, pushback: str | None = "1500") -> None:
        self.refusals, self.pushback = refusals, pushback
        self.offsets: list[int] = []
        self.metrics_calls = 0

    def UploadUpdate(self, messages: Any, timeout: float) -> pb.UploadUpdateResponse:
        self.offsets.append(next(iter(messages)).offset)
        if len(self.offsets) <= self.refusals:
            raise _Exhausted(self.pushback)
        return pb.UploadUpdateResponse(accepted=True, committed_offset=4)

    def GetUploadStatus(self, req: Any, timeout: float) -> pb.GetUploadStatusResponse:
        # Nothing held before the first stream; 2 bytes once a refused stream has written them.
        return pb.GetUploadStatusResponse(committed_offset=2 if self.offsets else 0, accepted=False)

    def ReportMetrics(self, req: Any, timeout: float) -> pb.ReportMetricsResponse:
        self.metrics_calls += 1
        if self.metrics_calls <= self.refusals:
            raise _Exhausted(self.pushback)
        return pb.ReportMetricsResponse()


def test_pause_is_read_from_the_trailing_metadata() -> None:
    assert retry_after_s(_Exhausted("2000")) == 2.0
    assert retry_after_s(_Exhausted("999999999")) == 60.0  # a hostile pause is capped
    assert retry_after_s(_Exhausted("soon")) is None
    assert retry_after_s(_Exhausted(None)) is None


def test_upload_refused_for_a_full_disk_resumes_at_the_held_offset(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(client_mod.time, "sleep", sleeps.append)
    client = _client(tmp_path)
    client.stub = stub = _FullDisk(refusals=2)  # type: ignore[assignment]
    env = pb.UpdateEnvelope(round=1, payload_sha256="0" * 64, payload_size=4)
    resp = client.upload(pb.SignedEnvelope(envelope=b"e", signature=b"s"), env, b"data")
    client.report_metrics(1, "train", {"loss": 1.0}, 4)
    client.close()
    assert resp.accepted
    assert stub.offsets == [0, 2, 2]  # resumed where the coordinator's partial ends
    assert sleeps == [1.5] * 4 and stub.metrics_calls == 3


def test_resource_exhausted_without_a_pause_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_mod.time, "sleep", lambda s: None)
    client = _client(tmp_path)
    client.stub = stub = _FullDisk(refusals=1, pushback=None)  # type: ignore[assignment]
    env = pb.UpdateEnvelope(round=1, payload_sha256="0" * 64, payload_size=4)
    with pytest.raises(grpc.RpcError):
        client.upload(pb.SignedEnvelope(envelope=b"e", signature=b"s"), env, b"data")
    client.close()
    assert stub.offsets == [0]
