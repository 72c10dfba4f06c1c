"""An enrolled site cannot fill the coordinator's disk with unfinished uploads: a per-site cap on their number
and bytes (max_partial_uploads_per_site = 3 in this federation; the byte cap: tests/coordinator/test_ingress_bounds.py)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from attacker import assert_healthy, envelope, payload_for, sign
from conftest import Coordinator
from proto_client import Wire

SC = grpc.StatusCode


def test_partial_uploads_are_capped_per_site(coord: Coordinator, wire: Wire, task: Any) -> None:
    site, key = "site-e", coord.site("site-e").signer()
    stub = wire.stub(coord.channel(coord.site(site)), "FederationService")
    req = wire.msg["UploadUpdateRequest"]

    def start(value: float, declared: int | None = None) -> Any:
        p = payload_for(task, value=value)
        signed = sign(wire, envelope(wire, task, site, p, payload_size=declared or len(p)), key)
        return stub.UploadUpdate(iter([req(envelope=signed, offset=0, data=p[:100])]), timeout=20)

    for value in (0.1, 0.2, 0.3):
        assert start(value).accepted is False
    with pytest.raises(grpc.RpcError) as e:  # a fourth unfinished upload
        start(0.4)
    assert e.value.code() == SC.RESOURCE_EXHAUSTED and "max_partial_uploads_per_site" in e.value.details()
    assert start(0.1).accepted is False  # resuming one it holds is fine
    partials = list((coord.fed / "state" / "uploads").glob(f"round-*/{site}-*.part"))
    assert len(partials) == 3
    recs = [r for r in coord.audit() if r["event"] == "update_refused" and r["fields"]["site"] == site]
    assert recs[-1]["fields"]["status"] == "RESOURCE_EXHAUSTED"
    assert_healthy(coord, wire, site)
