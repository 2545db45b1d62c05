"""Generate the Python gRPC code from proto/ into clients/python/.

Usage (from the repository root, with the dev extras installed):

    python scripts/gen_proto.py

The output is checked in so that users can ``pip install`` without protoc;
tests/test_generated_code.py fails when it is stale.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "clients" / "python"
PROTO_FILES = ("ordersidecar/v1/sidecar.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    bin_dir = Path(sys.executable).parent
    candidate = bin_dir / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: pip install -e '.[dev]' first")
    return found


def generate(out_root: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) with the mypy-protobuf plugins into *out_root*."""
    out_root.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *PROTO_FILES,
    ]
    subprocess.run(command, check=True)
    return sorted(
        path
        for path in out_root.rglob("*")
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES)
    )


if __name__ == "__main__":
    for generated in generate(OUT_ROOT):
        print(generated.relative_to(ROOT))
