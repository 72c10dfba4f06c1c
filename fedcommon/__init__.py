"""What both sides of the wire share, once (as Flower keeps ``flwr/common`` beside ``flwr/proto``).

The audit log, model manifests, TOML config loading, tensors as payloads, crash-safe file writes (``durable``), DP
accounting and CSPRNG noise generators (``dp``), the LoRA config and base-model loading (``models``), the
secure-aggregation primitives and certificate parsing (``certs``).

May import: protos, torch, safetensors, cryptography (and transformers/peft lazily, for model loading). Never
coordinator or site_agent.
"""
