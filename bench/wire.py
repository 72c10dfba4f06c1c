"""Wire cost of one round: bytes a site puts on the wire vs the raw adapter tensor bytes it has to send.

A real 2-site federation runs one round on loopback with mTLS, with the demo's adapter (LoRA r=16 on all linear
layers of the tiny model). Each site talks through its own counting TCP relay, so the TCP rows count everything
the site sent (TLS handshake, HTTP/2 framing, Join, FetchTask, metrics, and the upload). The message rows count the
UploadUpdate protobuf messages the coordinator received (recorded by its inbound tap).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.report import Row, write_results
from bench.tcp_counter import CountingRelay
from coordinator.rounds.store import Store
from coordinator.server import read_recording
from fedcommon import tensors
from protos.fedbridge.v1 import federation_service_pb2 as pb
from sandbox import localfed
from sandbox.tiny_model import build_tiny_model


def tensor_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def main() -> None:
    base = build_tiny_model()
    with tempfile.TemporaryDirectory(prefix="fedbridge-wire-") as tmp:
        fed = localfed.prepare(Path(tmp), base, n_sites=2, rounds=1, record_inbound=True,
                               training={"max_steps": 4, "batch_size": 4},
                               lora={"rank": 16, "alpha": 32.0, "target_modules": ["all-linear"]})
        with fed:
            port = fed.start_coordinator()
            relays = {s.name: CountingRelay(port).__enter__() for s in fed.sites}
            try:
                for s in fed.sites:
                    fed.port = relays[s.name].port  # the site dials its relay
                    fed.start_site(s)
                fed.port = port
                codes = fed.wait([s.name for s in fed.sites] + ["coordinator"], timeout=600)
            finally:
                for r in relays.values():
                    r.__exit__()
        assert set(codes.values()) == {0}, codes
        store = Store(fed.state_dir)
        ups = store.updates(1)
        raw = tensor_bytes(tensors.decode_state(ups[0].path.read_bytes()))
        model_bytes = tensor_bytes(tensors.decode_state((base / "model.safetensors").read_bytes()))
        assert fed.record_inbound is not None
        upload_msgs: dict[str, int] = {}
        last = ""  # later chunks of a stream carry no envelope: they belong to the stream's site
        for method, data in read_recording(fed.record_inbound):
            if method.endswith("/UploadUpdate"):
                msg = pb.UploadUpdateRequest.FromString(data)
                site = pb.UpdateEnvelope.FromString(msg.envelope.envelope).site if msg.HasField("envelope") else last
                last = site
                upload_msgs[site] = upload_msgs.get(site, 0) + len(data)
        store.close()

    rows: list[Row] = []
    for s in sorted(relays):
        rows.append(Row(f"{s}: upload messages / raw adapter tensor bytes", upload_msgs[s], raw,
                        upload_msgs[s] / raw, "bytes", "<= 1.02", upload_msgs[s] / raw <= 1.02))
        up = relays[s].up
        rows.append(Row(f"{s}: all TCP bytes sent in the round (TLS, HTTP/2, every RPC) / raw adapter tensor bytes",
                        up, raw, up / raw, "bytes", "<= 1.02", up / raw <= 1.02))
    rows.append(Row("adapter tensor bytes / full model tensor bytes", raw, model_bytes, raw / model_bytes, "bytes",
                    "informational (tiny model; r=16 all-linear)", None))
    write_results("wire", rows, [f"adapter: {raw} tensor bytes; payload (safetensors): {ups[0].size} bytes"])


if __name__ == "__main__":
    main()
