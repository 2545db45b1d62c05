"""The checked-in gRPC code matches what scripts/gen_proto.py makes from proto/ now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    fresh = gen_proto.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        checked_in = ROOT / "clients" / "python" / relative
        assert checked_in.exists(), f"{relative} is not checked in"
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"{relative} is stale: run python scripts/gen_proto.py and commit the result"
        )
