"""The fedbridge site agent: runs inside an institution's network, trains a LoRA/QLoRA adapter on private data and
sends only the signed adapter delta to the coordinator (outbound gRPC with mutual TLS).

- top level: the ``fedbridge-site`` CLI (``cli``), the task loop (``agent``), the gRPC client (``client``),
  ``site.toml`` (``config``), ``policy.toml`` (``policy``), ``preflight`` and progress bars.
- :mod:`site_agent.training`: data readers and validation, the TRL/PEFT trainers, held-out scoring.
- :mod:`site_agent.egress`: egress filters (clip, DP noise), the ε ledger, the egress guard, SecAgg masking.

The site agent never imports :mod:`coordinator`; it shares :mod:`protos` (the wire) and :mod:`fedcommon`.
"""
