"""The fedbridge coordinator: receives signed adapter deltas over mTLS gRPC, aggregates them, evaluates and publishes.

Grouped by concern; each subpackage owns its state and says what it may import:

- :mod:`coordinator.ingress`: the gRPC servicers (FederationService, SecAggService) and the upload path.
- :mod:`coordinator.rounds`: the round engine that wires the concerns together, quorum policy, the SQLite store,
  stored (memory-mapped) updates and the initial adapter.
- :mod:`coordinator.trust`: PKI, enrolment, access control and revocation.
- :mod:`coordinator.privacy`: central DP and secure aggregation.
- :mod:`coordinator.release`: shared evaluation, the release gate, merging, publishing, the model card,
  withdrawal and the GDPR record of processing.
- :mod:`coordinator.admin`: AdminService, its client, and the ``fedbridge-admin`` CLI.
- :mod:`coordinator.dashboard`: the live web dashboard and ``/metrics``.

Top level: ``config`` (``federation.toml``), ``errors`` (domain errors every concern raises), ``metrics``
(Prometheus counters), ``server`` (starts the process: gRPC, dashboard, engine).

The coordinator never imports :mod:`site_agent`; what both sides share is in :mod:`protos` (the wire) and
:mod:`fedcommon`, and the aggregation math in :mod:`strategies`.
"""
