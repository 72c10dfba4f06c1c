"""Regenerate the committed protobuf/gRPC code from ``protos/fedbridge/v1/*.proto``.

Run ``python -m protos.generate`` from the repository root. Paths are given relative to the root so the generated
modules import each other as ``protos.fedbridge.v1.*``. ``tests/protos/test_generated.py`` regenerates into a
temporary directory and fails on any difference from the committed files.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("protos") / "fedbridge" / "v1"


def proto_files() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / PROTO_DIR).glob("*.proto"))


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Run protoc (grpcio-tools) into ``out_dir``; return the generated files."""
    from grpc_tools import protoc  # dev extra: grpcio-tools

    out_dir.mkdir(parents=True, exist_ok=True)
    files = proto_files()
    args = ["grpc_tools.protoc", "-I.", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *files]
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} on {files}")
    return sorted(p for p in (out_dir / PROTO_DIR).glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate():
        print(path)
    sys.exit(0)
