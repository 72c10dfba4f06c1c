"""A gRPC client built from the ``.proto`` files alone, as an outside attacker would build one.

``grpc_tools.protoc`` compiles ``protos/fedbridge/v1/*.proto`` into a descriptor set in this test session. The
messages come from a private descriptor pool built from that set, and the stubs are plain ``grpc`` multi-callables
named from the service descriptors. Nothing here imports the project's ``protos`` package, its codec or its client:
the hostile suite finds what a third-party client written from the published protocol finds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"


@dataclass
class Wire:
    """Message classes by short name (``wire.msg["JoinRequest"]``) and services by name, from the .proto files."""

    msg: dict[str, Any] = field(default_factory=dict)
    enums: dict[str, Any] = field(default_factory=dict)
    services: dict[str, Any] = field(default_factory=dict)

    def stub(self, channel: Any, service: str) -> Any:
        """A stub for ``service`` on ``channel``: ``stub.Join(request, ...)``; stream shapes as the .proto declares."""
        return _Stub(channel, self.services[service], self.msg)


class _Stub:
    def __init__(self, channel: Any, svc: Any, msg: dict[str, Any]) -> None:
        for m in svc.methods:
            path = f"/{svc.full_name}/{m.name}"
            kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                    (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
                        (m.client_streaming, m.server_streaming)]
            setattr(self, m.name, kind(path, request_serializer=lambda x: x.SerializeToString(),
                                       response_deserializer=msg[m.output_type.name].FromString))


def compile_protos(out_dir: Path) -> Wire:
    """Run protoc on the protocol's .proto files and build a ``Wire`` from the descriptor set it writes."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_tools import protoc

    out = out_dir / "fedbridge.pb"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "fedbridge" / "v1").glob("*.proto"))
    if protoc.main(["protoc", f"-I{PROTO_ROOT}", "--include_imports", f"--descriptor_set_out={out}", *protos]) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()  # private: never the process-wide pool the project's modules use
    for f in fds.file:
        pool.Add(f)
    wire = Wire()
    for f in fds.file:
        fd = pool.FindFileByName(f.name)
        stack = list(fd.message_types_by_name.values())
        while stack:
            d = stack.pop()
            wire.msg[d.name if d.containing_type is None else f"{d.containing_type.name}.{d.name}"] = (
                message_factory.GetMessageClass(d))
            stack.extend(d.nested_types)
        for name, e in fd.enum_types_by_name.items():
            wire.enums[name] = e
        for name, s in fd.services_by_name.items():
            wire.services[name] = s
    return wire
