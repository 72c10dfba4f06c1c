"""Rounds: the round engine, the quorum policy, the durable store, stored updates and the initial adapter.

Owns: the round state machine (open -> closing -> closed), which sites take part, task offers, and every durable
write of round state (SQLite WAL plus fsynced artifacts). The engine is where the other concerns (ingress, trust,
privacy, release, admin control) are wired together by composition.

May import: protos, fedcommon, strategies, coordinator.{config,errors,metrics} and the concern packages it wires.
"""
