"""Configuration from flags and ORDER_SIDECAR_* env vars; the CLI's errors and help."""

from __future__ import annotations

import subprocess
import sys

import pytest
from order_sidecar.cli import build_parser
from order_sidecar.core.errors import ConfigError
from order_sidecar.runtime.config import ServeConfig, from_sources


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServeConfig:
    args = build_parser().parse_args(["serve", *argv])
    return from_sources(ServeConfig, args, env or {})


def test_defaults_are_local_and_need_no_services() -> None:
    config = parse([])
    assert config.listen == "127.0.0.1:50051"
    assert (config.nats_url, config.redis_url) == ("", ())
    assert config.chosen_lock_backend == "nats-kv"
    assert parse(["--redis-url", "redis://r:6379/0"]).chosen_lock_backend == "redis"


def test_flag_beats_env_beats_default() -> None:
    env = {"ORDER_SIDECAR_PARTITIONS": "32", "ORDER_SIDECAR_STREAM": "FROM_ENV"}
    config = parse(["--stream", "FROM_FLAG"], env)
    assert (config.stream, config.partitions) == ("FROM_FLAG", 32)


def test_repeatable_redis_url_and_comma_separated_env() -> None:
    urls = ("redis://a:1/0", "redis://b:2/0", "redis://c:3/0")
    assert parse([f"--redis-url={u}" for u in urls]).redis_url == urls
    assert parse([], {"ORDER_SIDECAR_REDIS_URL": ",".join(urls)}).redis_url == urls


@pytest.mark.parametrize(
    "argv, env, complaint",
    [
        (["--partitions", "0"], {}, "--partitions"),
        ([], {"ORDER_SIDECAR_LOCK_TTL": "soon"}, "ORDER_SIDECAR_LOCK_TTL"),
        (["--listen", "nowhere"], {}, "host:port"),
        (["--stream", "a.b"], {}, "--stream"),
        (["--subject-prefix", "a.>"], {}, "--subject-prefix"),
        (["--redis-url", "http://x"], {}, "redis://"),
        (["--on-lock-unavailable", "maybe"], {}, "'fence' or 'reject'"),
        (["--lock-backend", "zookeeper"], {}, "redis, nats-kv or auto"),
        (["--lock-backend", "redis"], {}, "--redis-url"),
        (["--nats-sync-interval", "sometimes"], {}, "'always'"),
    ],
)
def test_invalid_values_name_the_flag_and_env_var(
    argv: list[str], env: dict[str, str], complaint: str
) -> None:
    with pytest.raises(ConfigError, match="expected") as caught:
        parse(argv, env)
    assert complaint in str(caught.value)


def test_cli_exits_2_with_a_clear_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "order_sidecar.cli", "serve", "--lock-ttl", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--lock-ttl / ORDER_SIDECAR_LOCK_TTL" in result.stderr


def test_cli_exits_2_when_nats_is_not_there() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "order_sidecar.cli",
            "serve",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--listen",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "cannot connect to NATS at nats://127.0.0.1:1" in result.stderr


def test_help_lists_every_option_with_its_env_var() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "order_sidecar.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = " ".join(result.stdout.split())
    for name in ServeConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in text
        assert f"ORDER_SIDECAR_{name.upper()}" in text


def test_bench_prints_a_table_and_fails_loudly_without_a_sidecar() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "order_sidecar.cli",
            "bench",
            "--target",
            "127.0.0.1:1",
            "--events",
            "3",
            "--concurrency",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[1].split()[:4] == ["mode", "events", "failed", "seconds"]
    assert "first error: UNAVAILABLE" in result.stdout
