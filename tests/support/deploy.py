"""What the deployment tests share: the repository's files and how to read them."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pytest
from order_sidecar.cli import build_parser
from order_sidecar.core.errors import ConfigError
from order_sidecar.runtime.config import ENV_PREFIX, ServeConfig, env_name, flag_name, from_sources

ROOT = Path(__file__).resolve().parents[2]


COMPOSE_FILE = ROOT / "docker-compose.yml"


DOCKERFILE = ROOT / "Dockerfile"


HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"


def require_tool(name: str) -> str:
    """The tool's path; skip when it is missing locally, fail when it is missing in CI."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not installed (.ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def serve_env_names() -> set[str]:
    """Every env var ``order-sidecar serve`` reads, from its config dataclass."""
    return {env_name(item.name) for item in dataclasses.fields(ServeConfig)}


def serve_flag_names() -> set[str]:
    """Every ``--flag`` of ``order-sidecar serve``, from its config dataclass."""
    return {flag_name(item.name) for item in dataclasses.fields(ServeConfig)}


def sidecar_config(command: list[str], env: Mapping[str, str]) -> ServeConfig:
    """The ServeConfig a sidecar started with *command* and *env* would run with.

    Fails the test on an unknown env var or flag, and on anything the sidecar's start-up
    validation refuses.
    """
    assert command[:2] == ["order-sidecar", "serve"], command
    unknown_env = {k for k in env if k.startswith(ENV_PREFIX)} - serve_env_names()
    assert not unknown_env, f"not options of order-sidecar serve: {sorted(unknown_env)}"
    # Exact names: argparse would also accept an abbreviation like --nats for --nats-url.
    flags = {arg.split("=", 1)[0] for arg in command[2:] if arg.startswith("--")}
    assert flags <= serve_flag_names(), f"unknown flags: {sorted(flags - serve_flag_names())}"
    try:
        args = build_parser().parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"order-sidecar refuses the command line {command}")
    try:
        return from_sources(ServeConfig, args, env)
    except ConfigError as error:
        pytest.fail(f"the sidecar would not start: {error}")


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of host:port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def load_producer_module() -> ModuleType:
    """examples/producer.py as a module, to ask it which env vars it reads."""
    spec = importlib.util.spec_from_file_location(
        "producer_example", ROOT / "examples" / "producer.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass
class Stage:
    """One FROM ... stage of a Dockerfile: its base and its instructions."""

    base: str
    name: str
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        """Arguments of every *keyword* instruction."""
        return [args for kw, args in self.instructions if kw == keyword]


def dockerfile_stages(text: str) -> list[Stage]:
    """The Dockerfile's stages (comments dropped, continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[Stage] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(parts[0], name, []))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, args))
    return stages
