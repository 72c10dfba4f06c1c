"""The hostile client really is independent of the project's protocol package, and speaks the same wire."""

from __future__ import annotations

from proto_client import Wire


def test_messages_come_from_a_private_pool_and_match_the_protocol(wire: Wire) -> None:
    import protos.fedbridge.v1.federation_service_pb2 as ours

    theirs = wire.msg["JoinRequest"]
    assert theirs is not ours.JoinRequest
    assert theirs.DESCRIPTOR.file.pool is not ours.JoinRequest.DESCRIPTOR.file.pool
    for name, desc in ours.DESCRIPTOR.message_types_by_name.items():
        other = wire.msg[name].DESCRIPTOR
        assert {f.name: f.number for f in desc.fields} == {f.name: f.number for f in other.fields}, name
    # Bytes written by one side parse on the other.
    raw = theirs(agent_version="x", lora_rank=8, modes=["sft"]).SerializeToString()
    assert ours.JoinRequest.FromString(raw).lora_rank == 8
    assert {"FederationService", "AdminService", "SecAggService"} <= set(wire.services)
