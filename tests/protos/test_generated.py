"""The committed generated protobuf/gRPC code must equal a fresh regeneration."""

from __future__ import annotations

from pathlib import Path

from protos.generate import PROTO_DIR, ROOT, generate


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    # Prepare / Execute
    fresh = generate(tmp_path)
    # Assert
    assert {p.name for p in fresh} >= {f"{stem}_pb2{ext}" for stem in ("federation_service", "secagg_service",
                                                                      "admin_service")
                                       for ext in (".py", "_grpc.py", ".pyi")}
    for path in fresh:
        committed = ROOT / PROTO_DIR / path.name
        assert committed.exists(), f"{committed} is not committed; run python -m protos.generate"
        assert committed.read_text() == path.read_text(), (
            f"{committed.name} differs from the .proto; run python -m protos.generate and commit the result")
