"""The fedbridge protocol: ``fedbridge/v1/*.proto``, the generated code (``python -m protos.generate``), and the
wire codec (:mod:`protos.codec`: payload format, chunking, hashing, adapter specs, signed envelopes).

May import only the protocol's own dependencies: grpcio, protobuf, safetensors and cryptography.
"""
