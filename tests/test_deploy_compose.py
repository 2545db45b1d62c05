"""docker-compose.yml, the Dockerfile and its health check: valid, and true to the sidecar.

The engine cannot run here, so the compose file is checked as ``docker-compose config``
(Debian's docker-compose) normalizes it, against the sidecar's real options: every
``ORDER_SIDECAR_*`` variable and ``--flag`` must be one ``order-sidecar serve`` knows, the
whole configuration must pass the sidecar's own start-up validation, producers must call
the address their sidecar listens on, and Prometheus must scrape the sidecars' metrics
ports. The health check script the image runs is exercised against real sidecars.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from order_sidecar.runtime.config import ServeConfig
from order_sidecar.runtime.security import is_loopback

from tests.support.deploy import (
    COMPOSE_FILE,
    DOCKERFILE,
    HEALTHCHECK,
    ROOT,
    dockerfile_stages,
    load_producer_module,
    require_tool,
    sidecar_config,
    split_address,
)
from tests.support.servers import NatsServer, RedisServer, SidecarProcess, wait_until

SIDECAR_IMAGE_SERVICES = ("sidecar-a", "sidecar-b")
PAIRS = {"producer-a": "sidecar-a", "producer-b": "sidecar-b"}


# -- the sidecar's real options ----------------------------------------------------------


# -- the Dockerfile ------------------------------------------------------------------------


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore *patterns* leave *path* (or a folder above it) out."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        options = [pattern]
        if pattern.startswith("**/"):  # any depth, the root included
            options.append(pattern[3:])
        if any(fnmatch.fnmatchcase(p, o) for p in prefixes for o in options):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfile_is_small_non_root_and_health_checked() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    final = stages[-1]
    assert final.base.startswith("python:3.11-slim"), final.base
    users = final.all("USER")
    assert users, "the final stage runs as root (no USER)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    # Numeric, so that Kubernetes' runAsNonRoot can check it.
    assert user.isdigit() and int(user) > 0, users[-1]

    healthchecks = final.all("HEALTHCHECK")
    assert len(healthchecks) == 1 and "CMD" in healthchecks[0], healthchecks
    assert "/app/healthcheck.py" in healthchecks[0]
    copies = {args.split()[-1]: args.split()[-2] for args in final.all("COPY")}
    assert copies.get("/app/healthcheck.py") == "deploy/docker/healthcheck.py"

    exposed = {int(port) for args in final.all("EXPOSE") for port in args.split()}
    defaults = ServeConfig()
    assert split_address(defaults.listen)[1] in exposed
    assert split_address(defaults.metrics_listen)[1] in exposed
    assert final.all("CMD") == ['["order-sidecar", "serve"]']


def test_dockerfile_copies_exist_and_are_not_dockerignored() -> None:
    patterns = dockerignore_patterns()
    sources: list[str] = []
    for stage in dockerfile_stages(DOCKERFILE.read_text()):
        for args in stage.all("COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            if any(w.startswith("--from=") for w in args.split()):
                continue  # from another stage, not from the build context
            sources.extend(words[:-1])
    assert "sidecar" in sources and "clients/python" in sources, sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    # The context leaves out local state that would bloat or leak into the image.
    for local in (".venv", ".git", "clients/node/node_modules", "sidecar/x/__pycache__"):
        assert dockerignored(local, patterns), f"{local} is sent to the docker build"


# -- docker-compose.yml --------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as ``docker-compose config`` normalizes it."""
    binary = require_tool("docker-compose")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    return {str(key): str(value) for key, value in env.items()}


def test_compose_has_the_seed_setup(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "nats",
        "redis",
        "sidecar-a",
        "sidecar-b",
        "producer-a",
        "producer-b",
        "consumer",
        "prometheus",
    }
    # JetStream on file storage, in a named volume so events survive the container.
    nats = services["nats"]
    assert nats["image"].startswith("nats:")
    command = nats["command"]
    assert "-js" in command and "-sd" in command, command
    store = command[command.index("-sd") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in nats["volumes"]}
    assert mounts.get(store) in compose["volumes"], f"{store} is not on a named volume"
    assert services["redis"]["image"].startswith("redis:")
    # Every service that needs another waits for it to be healthy, not just started.
    for name in ("sidecar-a", "sidecar-b"):
        for backend in ("nats", "redis"):
            assert services[name]["depends_on"][backend]["condition"] == "service_healthy"
    for producer, sidecar in PAIRS.items():
        assert services[producer]["depends_on"][sidecar]["condition"] == "service_healthy"


def test_compose_sidecars_use_real_options(compose: dict[str, Any]) -> None:
    services = compose["services"]
    configs = {
        name: sidecar_config(services[name]["command"], service_env(services[name]))
        for name in SIDECAR_IMAGE_SERVICES
    }
    for name, config in configs.items():
        # The backends are the compose services, on their default ports.
        nats_url, redis_url = urlsplit(config.nats_url), urlsplit(config.redis_url[0])
        assert (nats_url.hostname, nats_url.port) == ("nats", 4222), name
        assert (redis_url.hostname, redis_url.port) == ("redis", 6379), name
        assert config.chosen_lock_backend == "redis", name
        # gRPC stays on localhost; only /metrics is reachable for Prometheus.
        assert is_loopback(split_address(config.listen)[0]), config.listen
        assert split_address(config.metrics_listen)[0] in ("0.0.0.0", "::"), name
    # Both sidecars publish to one stream, under their own producer names.
    assert len({c.stream for c in configs.values()}) == 1
    assert len({c.producer_id for c in configs.values()}) == len(configs)
    assert all(c.producer_id for c in configs.values())


def test_compose_producers_call_their_own_sidecar(compose: dict[str, Any]) -> None:
    services = compose["services"]
    producer = load_producer_module()
    for name, sidecar_name in PAIRS.items():
        service = services[name]
        sidecar = services[sidecar_name]
        # The producer joins its sidecar's network namespace: localhost is the sidecar.
        assert service["network_mode"] == f"service:{sidecar_name}"
        assert service["image"] == sidecar["image"]
        script = service["command"][-1]
        assert script.startswith("/app/examples/"), script
        assert (ROOT / "examples" / Path(script).name).is_file()
        env = service_env(service)
        args = producer.parse_args([], env)  # what the example reads from these env vars
        used = {k for k in env if k.startswith("PRODUCER_")}
        assert args.target == env["PRODUCER_TARGET"], "PRODUCER_TARGET is not read"
        assert args.name == env["PRODUCER_NAME"], "PRODUCER_NAME is not read"
        assert {"PRODUCER_TARGET", "PRODUCER_NAME"} <= used
        sidecar_listen = sidecar_config(sidecar["command"], service_env(sidecar)).listen
        assert split_address(args.target) == split_address(sidecar_listen)


def test_compose_image_built_once_and_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    image = services["sidecar-a"]["image"]
    builders = [name for name, s in services.items() if "build" in s]
    assert builders == ["sidecar-a"], builders
    build = services["sidecar-a"]["build"]
    assert Path(build["context"]).resolve() == ROOT
    assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
    for name, service in services.items():
        if service.get("image") != image:
            continue
        # Sidecars keep the image's HEALTHCHECK; the others run no sidecar of their own.
        if name in SIDECAR_IMAGE_SERVICES:
            assert "healthcheck" not in service, name
        else:
            assert service["healthcheck"]["test"] == ["NONE"], name


def test_compose_consumer_reads_the_sidecars_stream(compose: dict[str, Any]) -> None:
    services = compose["services"]
    command = services["consumer"]["command"]
    assert command[:2] == ["python", "-m"], command
    module = command[2]
    options = dict(zip(command[3::2], command[4::2], strict=True))
    sidecar = services["sidecar-a"]
    config = sidecar_config(sidecar["command"], service_env(sidecar))
    assert options["--nats-url"] == config.nats_url
    assert options["--stream"] == config.stream
    db_dir = str(Path(options["--db"]).parent)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["consumer"]["volumes"]}
    assert mounts.get(db_dir) in compose["volumes"], f"{db_dir} is not on a named volume"
    # The example consumer ships with the Python client (clients/python), installed in
    # the image with the sidecar.
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # its package is missing too
        spec = None
    assert spec is not None, f"no module {module}"
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for flag in options:
        assert flag in result.stdout, f"{module} has no {flag}"


def test_compose_prometheus_scrapes_every_sidecar(compose: dict[str, Any], tmp_path: Path) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in prometheus["volumes"]}
    config_path = mounts["/etc/prometheus/prometheus.yml"]
    assert config_path.resolve() == ROOT / "deploy" / "compose" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    expected = set()
    for name in SIDECAR_IMAGE_SERVICES:
        sidecar = services[name]
        metrics = sidecar_config(sidecar["command"], service_env(sidecar)).metrics_listen
        # The sidecar owns its network namespace, so its service name reaches it.
        assert "network_mode" not in sidecar
        expected.add(f"{name}:{split_address(metrics)[1]}")
    assert targets == expected

    # promtool checks the config with its rule files laid out as the container sees them.
    promtool = require_tool("promtool")
    for container_path, host_path in mounts.items():
        copy = tmp_path / container_path.lstrip("/")
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(host_path, copy)
    for rule_file in config.get("rule_files", []):
        assert (tmp_path / "etc" / "prometheus" / rule_file).is_file(), rule_file
    result = subprocess.run(
        [promtool, "check", "config", "etc/prometheus/prometheus.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


# -- the health check the image runs ------------------------------------------------------


def run_healthcheck(*args: str, env: Mapping[str, str] | None = None) -> int:
    """The exit status of deploy/docker/healthcheck.py."""
    result = subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--timeout", "2", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )
    return result.returncode


def test_healthcheck_follows_the_sidecar(
    sidecars: Callable[..., SidecarProcess],
    redis_server: RedisServer,
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    nats = NatsServer(tmp_path, "own-nats")
    nats.start()
    try:
        sidecar = sidecars(
            "checked",
            nats_url=nats.url,
            redis_url=redis_server.url,
            stream=names["stream"],
            subject_prefix=names["subject_prefix"],
            health_interval="0.2",
        )
        port = sidecar.target.rsplit(":", 1)[1]
        assert run_healthcheck("--target", sidecar.target) == 0
        # Without --target it dials the sidecar's own listen address; a wildcard host
        # means loopback.
        assert run_healthcheck(env={"ORDER_SIDECAR_LISTEN": f"0.0.0.0:{port}"}) == 0

        nats.kill()  # the sidecar answers NOT_SERVING until NATS is back
        wait_until(
            lambda: run_healthcheck("--target", sidecar.target) == 1,
            20,
            "readiness to fail with NATS down",
        )
        # Liveness holds: restarting the sidecar would not bring NATS back.
        assert run_healthcheck("--live", "--target", sidecar.target) == 0

        sidecar.kill()
        assert run_healthcheck("--live", "--target", sidecar.target) == 1
    finally:
        nats.kill()
