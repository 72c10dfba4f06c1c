"""The coordinator's aggregation inside a Flower deployment: a Flower ``ServerApp`` and ``Strategy``.

- :mod:`coordinator.flower.strategy`: :class:`FedbridgeStrategy`, any rule of :mod:`strategies` (by the name
  ``federation.toml`` uses) as a Flower ``Strategy``, with FedEx-LoRA's base residual carried between rounds.
- :mod:`coordinator.flower.serverapp`: ``app``, which builds the round-0 adapter and each round's task from a
  ``federation.toml`` exactly as the coordinator does, runs the rounds and writes the final PEFT adapter.

Only the transport is Flower's: no fedbridge mTLS identity, envelope signature, audit log, quorum policy, shared
evaluation or release gate runs here (docs/operate/flower.md). ``flwr`` is imported only in this subpackage;
``import coordinator`` never imports it.
"""
