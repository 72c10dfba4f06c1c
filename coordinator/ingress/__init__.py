"""Ingress: the gRPC servicers (FederationService, SecAggService) and the upload path.

Owns: converting protobuf to domain calls, mapping domain errors to gRPC statuses, and the chunked, resumable
upload of signed updates (validation before anything is stored). Servicers stay thin: the identity comes from the
peer certificate (:mod:`coordinator.trust`), the decision from the round engine (:mod:`coordinator.rounds`).

May import: protos, fedcommon, strategies, coordinator.{config,errors,metrics}, coordinator.trust,
coordinator.rounds (store rows, the engine it serves).
"""
