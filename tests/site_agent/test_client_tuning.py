"""The site client's WAN settings (bench/link.py): keepalive on its channel, and retries after a dropped stream that
never wait more than MAX_RETRY_DELAY_S, so an upload resumes promptly once a cut link is back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

import site_agent.client as client_mod
from coordinator.trust.pki import create_dev_pki
from protos.fedbridge.v1 import federation_service_pb2 as pb
from site_agent.client import CoordinatorClient
from site_agent.config import SiteConfig, SiteData, SiteTls


def _client(tmp_path: Path) -> CoordinatorClient:
    kit = create_dev_pki(tmp_path / "pki", ["site-a"]).sites["site-a"]
    cfg = SiteConfig(name="site-a", coordinator="127.0.0.1:1", base_model=tmp_path, work_dir=tmp_path,
                     tls=SiteTls(kit.ca, kit.cert, kit.key, kit.signing_key), data=SiteData(tmp_path / "t.jsonl"),
                     retry_for_s=60)
    return CoordinatorClient(cfg)


def test_the_channel_pings_a_silent_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    real = grpc.secure_channel

    def spy(target: str, creds: Any, options: Any = None) -> Any:
        seen.update(dict(options or []))
        return real(target, creds, options=options)

    monkeypatch.setattr(grpc, "secure_channel", spy)
    _client(tmp_path).close()
    assert seen["grpc.keepalive_time_ms"] <= 10_000
    assert seen["grpc.keepalive_timeout_ms"] <= 5_000
    assert seen["grpc.max_reconnect_backoff_ms"] <= 2_000


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "link down"


class _CutLink:
    """A stub whose upload streams break ``breaks`` times (the link is down), then the upload is accepted."""

    def __init__(self, breaks: int) -> None:
        self.breaks = breaks
        self.uploads = 0

    def UploadUpdate(self, messages: Any, timeout: float) -> pb.UploadUpdateResponse:
        self.uploads += 1
        next(iter(messages))
        if self.uploads <= self.breaks:
            raise _Unavailable()
        return pb.UploadUpdateResponse(accepted=True, committed_offset=4)

    def GetUploadStatus(self, req: Any, timeout: float) -> pb.GetUploadStatusResponse:
        return pb.GetUploadStatusResponse(committed_offset=0, accepted=False)


def test_retries_after_a_cut_never_wait_more_than_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(client_mod.time, "sleep", sleeps.append)
    client = _client(tmp_path)
    client.stub = _CutLink(breaks=8)  # type: ignore[assignment]
    env = pb.UpdateEnvelope(round=1, payload_sha256="0" * 64, payload_size=4)
    resp = client.upload(pb.SignedEnvelope(envelope=b"e", signature=b"s"), env, b"data")
    client.close()
    assert resp.accepted and client.stub.uploads == 9  # type: ignore[attr-defined]
    assert len(sleeps) == 8
    assert max(sleeps) <= 1.0, sleeps
    assert client_mod.MAX_RETRY_DELAY_S <= 1.0
