"""Configuration: frozen dataclasses, each field a CLI flag and an ``ORDER_SIDECAR_*`` env var.

A field's metadata holds its help text. Precedence: flag, then env var, then default.
Everything is validated at start-up, and a bad value stops the sidecar with a message
that names the flag, the env var and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from order_sidecar.core.errors import ConfigError

ENV_PREFIX = "ORDER_SIDECAR_"
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")
_SUBJECT_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_LOCK_UNAVAILABLE_POLICIES = ("fence", "reject")


def option(default: Any, help_text: str) -> Any:
    """A config field with its help text (flag and env var names come from the field)."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class NatsOptions:
    """Where the stream lives and how it is provisioned."""

    nats_url: str = option(
        "", "NATS server URL; unset: start an embedded nats-server with JetStream in --data-dir"
    )
    stream: str = option("ENTITY_EVENTS", "JetStream stream name")
    subject_prefix: str = option("events", "first subject token(s) of every event")
    partitions: int = option(16, "partition count in the subject; fixed for a stream's life")
    stream_replicas: int = option(1, "stream replicas when the sidecar creates the stream")
    duplicate_window: float = option(
        120.0, "seconds JetStream remembers idempotency keys (stream duplicate window)"
    )
    publish_timeout: float = option(5.0, "seconds to wait for JetStream's publish ack")

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid option."""
        if not _STREAM_NAME.fullmatch(self.stream):
            _bad("stream", self.stream, "1-255 characters of [A-Za-z0-9_-]")
        if not _SUBJECT_PREFIX.fullmatch(self.subject_prefix):
            _bad("subject_prefix", self.subject_prefix, "dot-separated tokens of [A-Za-z0-9_-]")
        check_range("partitions", self.partitions, 1, 100_000)
        check_range("stream_replicas", self.stream_replicas, 1, 5)
        check_range("duplicate_window", self.duplicate_window, 1.0, 7 * 86400.0)
        check_range("publish_timeout", self.publish_timeout, 0.1, 300.0)


@dataclass(frozen=True)
class SecurityOptions:
    """TLS, the shared token and backend credentials (docs/security.md).

    Only paths live here: a secret comes from a file or its own env var (read by
    ``security.load_secrets``), never from a flag's value, which ``ps`` would show.
    """

    tls_cert: str = option("", "PEM certificate chain of the gRPC port; with --tls-key: TLS")
    tls_key: str = option("", "PEM private key of --tls-cert")
    tls_client_ca: str = option(
        "", "PEM CA bundle: clients must show a certificate it signed (mutual TLS)"
    )
    auth_token_file: str = option(
        "",
        "file holding a token every RPC but health checks must send as 'authorization: "
        "Bearer <token>' (or the token itself in ORDER_SIDECAR_AUTH_TOKEN)",
    )
    nats_user: str = option("", "NATS user; its password from --nats-password-file")
    nats_password_file: str = option(
        "", "file holding the NATS password (or the password in ORDER_SIDECAR_NATS_PASSWORD)"
    )
    nats_token_file: str = option(
        "", "file holding a NATS auth token (or the token in ORDER_SIDECAR_NATS_TOKEN)"
    )
    nats_nkey_seed_file: str = option("", "NATS user NKey seed file (one line SU...)")
    nats_creds_file: str = option("", "NATS credentials file: user JWT and seed, from nsc")
    nats_tls_ca: str = option("", "PEM CA bundle that verifies the NATS server; turns TLS on")
    nats_tls_cert: str = option("", "PEM client certificate for NATS (with --nats-tls-key)")
    nats_tls_key: str = option("", "PEM private key of --nats-tls-cert")
    redis_username: str = option("", "Redis ACL user; its password from --redis-password-file")
    redis_password_file: str = option(
        "", "file holding the Redis password (or the password in ORDER_SIDECAR_REDIS_PASSWORD)"
    )
    redis_tls_ca: str = option("", "PEM CA bundle that verifies Redis (rediss:// URLs)")
    redis_tls_cert: str = option("", "PEM client certificate for Redis (with --redis-tls-key)")
    redis_tls_key: str = option("", "PEM private key of --redis-tls-cert")

    def check_security(self, nats_url: str, redis_urls: Sequence[str]) -> None:
        """Raise ConfigError naming the first invalid or conflicting security option."""
        for name in _SECURITY_FILES:
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                _bad(name, path, "a readable file")
        for cert, key in (
            ("tls_cert", "tls_key"),
            ("nats_tls_cert", "nats_tls_key"),
            ("redis_tls_cert", "redis_tls_key"),
        ):
            if bool(getattr(self, cert)) != bool(getattr(self, key)):
                _bad(cert, getattr(self, cert), f"both {flag_name(cert)} and {flag_name(key)}")
        if self.tls_client_ca and not self.tls_cert:
            _bad("tls_cert", "", "a server certificate when --tls-client-ca is set")
        nats_auth = [n for n in _NATS_AUTH if getattr(self, n)]
        if len(nats_auth) > 1:
            others = ", ".join(flag_name(name) for name in _NATS_AUTH)
            _bad(nats_auth[1], getattr(self, nats_auth[1]), f"only one of {others}")
        if not nats_url:
            for name in (*_NATS_AUTH, "nats_password_file", "nats_tls_ca", "nats_tls_cert"):
                if getattr(self, name):
                    _bad("nats_url", "", f"your NATS server's URL with {flag_name(name)}")
        redis_tls = [n for n in ("redis_tls_ca", "redis_tls_cert") if getattr(self, n)]
        if redis_tls and not (redis_urls and all(u.startswith("rediss://") for u in redis_urls)):
            wanted = f"rediss:// URLs with {flag_name(redis_tls[0])}"
            _bad("redis_url", ",".join(redis_urls), wanted)


_USER_NAMES = ("nats_user", "redis_username")
_SECURITY_FILES = tuple(
    item.name for item in dataclasses.fields(SecurityOptions) if item.name not in _USER_NAMES
)
_NATS_AUTH = ("nats_user", "nats_token_file", "nats_nkey_seed_file", "nats_creds_file")


@dataclass(frozen=True)
class ServeConfig(NatsOptions, SecurityOptions):
    """Options of ``order-sidecar serve``."""

    listen: str = option(
        "127.0.0.1:50051", "gRPC listen address host:port; beyond loopback, set --tls-cert"
    )
    lock_backend: str = option(
        "auto", "redis, nats-kv, or auto: redis when --redis-url is set, else nats-kv"
    )
    redis_url: tuple[str, ...] = option(
        (), "Redis master URL for locks; repeat (or comma-separate) for a Redlock quorum"
    )
    lock_bucket: str = option("ORDERSIDECAR_LOCKS", "KV bucket of the nats-kv lock backend")
    kv_replicas: int = option(1, "KV bucket replicas when the sidecar creates it")
    data_dir: str = option(
        "", "embedded nats-server's data folder (default ~/.local/share/order-sidecar/nats)"
    )
    nats_sync_interval: str = option(
        "", "embedded nats-server's JetStream sync_interval, e.g. 'always' (default: server's, 2m)"
    )
    lock_ttl: float = option(10.0, "seconds a lock lives unless renewed (renewed at ttl/3)")
    lock_wait: float = option(5.0, "seconds to wait for another sidecar's entity lock")
    lock_linger: float = option(
        1.0,
        "seconds an idle entity's lock is kept for its next event (handed over at once "
        "when another sidecar waits; 0 releases at once)",
    )
    position_hints: int = option(
        100_000,
        "entities whose last position is remembered to skip a read (checked by the "
        "broker's fencing; 0 turns it off)",
    )
    on_lock_unavailable: str = option(
        "fence",
        "when the lock backend is down: 'fence' publishes on, order kept by the broker's "
        "fencing check; 'reject' answers UNAVAILABLE",
    )
    group_commit: bool = option(
        True,
        "commit the events that queue up, of many entities, as one JetStream atomic batch "
        "with one ack (needs nats-server 2.12+ and allow_atomic on the stream; otherwise, "
        "or with --no-group-commit, one event per round trip)",
    )
    batch_max_events: int = option(500, "most events in one atomic batch (JetStream: 1,000)")
    batches_in_flight: int = option(
        4, "atomic batches in flight at once (JetStream allows 50 per stream, all sidecars)"
    )
    producer_id: str = option("", "name of this producer in logs (default: host-pid)")
    max_batch: int = option(1000, "most events in one PublishBatch")
    max_conflict_retries: int = option(20, "fenced publish attempts before answering ABORTED")
    max_inflight_entities: int = option(64, "entities of one batch published concurrently")
    stream_window: int = option(
        256, "events of one PublishStream in flight before it stops reading"
    )
    max_streams: int = option(64, "concurrent PublishStream calls; more: RESOURCE_EXHAUSTED")
    max_message_bytes: int = option(
        4 * 1024 * 1024, "largest gRPC request in bytes; larger: RESOURCE_EXHAUSTED"
    )
    shutdown_grace: float = option(10.0, "seconds SIGTERM waits for in-flight requests")
    log_level: str = option("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = option("text", "text or json (one object per line)")
    metrics_listen: str = option(
        "127.0.0.1:9464", "Prometheus /metrics address host:port ('' to turn it off)"
    )
    health_interval: float = option(
        1.0, "seconds between checks of NATS and the lock backend for gRPC health"
    )

    @property
    def chosen_lock_backend(self) -> str:
        """The lock backend in use once 'auto' is resolved."""
        if self.lock_backend != "auto":
            return self.lock_backend
        return "redis" if self.redis_url else "nats-kv"

    @property
    def producer_name(self) -> str:
        """The configured producer id, or host-pid."""
        return self.producer_id or f"{socket.gethostname()}-{os.getpid()}"

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid option."""
        super().validate()
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            _bad("listen", self.listen, "host:port, e.g. 127.0.0.1:50051")
        if self.lock_backend not in ("auto", "redis", "nats-kv"):
            _bad("lock_backend", self.lock_backend, "redis, nats-kv or auto")
        if self.lock_backend == "redis" and not self.redis_url:
            _bad("redis_url", "", "at least one redis:// URL with --lock-backend redis")
        for url in self.redis_url:
            if not url.startswith(("redis://", "rediss://", "unix://")):
                _bad("redis_url", url, "a redis://, rediss:// or unix:// URL")
        check_range("lock_ttl", self.lock_ttl, 0.5, 3600.0)
        check_range("lock_wait", self.lock_wait, 0.0, 3600.0)
        check_range("lock_linger", self.lock_linger, 0.0, self.lock_ttl / 2)
        check_range("position_hints", self.position_hints, 0, 10_000_000)
        if self.on_lock_unavailable not in _LOCK_UNAVAILABLE_POLICIES:
            _bad("on_lock_unavailable", self.on_lock_unavailable, "'fence' or 'reject'")
        check_range("max_batch", self.max_batch, 1, 100_000)
        check_range("max_conflict_retries", self.max_conflict_retries, 1, 1000)
        check_range("max_inflight_entities", self.max_inflight_entities, 1, 100_000)
        check_range("stream_window", self.stream_window, 1, 100_000)
        check_range("batch_max_events", self.batch_max_events, 2, 1000)
        check_range("batches_in_flight", self.batches_in_flight, 1, 50)
        check_range("max_streams", self.max_streams, 1, 100_000)
        check_range("max_message_bytes", self.max_message_bytes, 1024, 1024**3)
        self.check_security(self.nats_url, self.redis_url)
        check_range("shutdown_grace", self.shutdown_grace, 0.0, 3600.0)
        check_range("kv_replicas", self.kv_replicas, 1, 5)
        check_range("health_interval", self.health_interval, 0.1, 60.0)
        if self.metrics_listen:
            host, _, port = self.metrics_listen.rpartition(":")
            if not host or not port.isdigit() or not 0 <= int(port) < 65536:
                _bad("metrics_listen", self.metrics_listen, "host:port, e.g. 127.0.0.1:9464")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.lock_bucket):
            _bad("lock_bucket", self.lock_bucket, "1-64 characters of [A-Za-z0-9_-]")
        if self.nats_sync_interval and not re.fullmatch(
            r"always|\d+(ms|s|m|h)", self.nats_sync_interval
        ):
            _bad("nats_sync_interval", self.nats_sync_interval, "'always' or a duration like 10s")
        if self.log_format not in ("text", "json"):
            _bad("log_format", self.log_format, "text or json")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            _bad("log_level", self.log_level, "DEBUG, INFO, WARNING or ERROR")


@dataclass(frozen=True)
class VerifyConfig:
    """Options of ``order-sidecar verify``."""

    nats_url: str = option("nats://127.0.0.1:4222", "NATS server URL")
    stream: str = option("ENTITY_EVENTS", "JetStream stream name")
    json: bool = option(False, "print the report as JSON")

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid option."""
        if not _STREAM_NAME.fullmatch(self.stream):
            _bad("stream", self.stream, "1-255 characters of [A-Za-z0-9_-]")


def env_name(field_name: str) -> str:
    """The env var that sets *field_name*."""
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    """The CLI flag that sets *field_name*."""
    return "--" + field_name.replace("_", "-")


def _bad(field_name: str, value: object, allowed: str) -> None:
    raise ConfigError(
        f"invalid {flag_name(field_name)} / {env_name(field_name)} = {value!r}: expected {allowed}"
    )


def check_range(field_name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        _bad(field_name, value, f"a number from {low} to {high}")


def add_arguments(parser: argparse.ArgumentParser, config_type: type[Any]) -> None:
    """Add one flag per field of *config_type*; defaults are resolved later, with env vars."""
    for item in dataclasses.fields(config_type):
        kind = _field_kind(item)
        help_text = f"{item.metadata['help']} [env {env_name(item.name)}; default {_shown(item)}]"
        flag = flag_name(item.name)
        if kind is bool and item.default:
            # On by default: --flag / --no-flag.
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=None, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif kind is tuple:
            parser.add_argument(flag, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)


ConfigT = TypeVar("ConfigT")


def from_sources(
    config_type: type[ConfigT], args: argparse.Namespace, env: Mapping[str, str]
) -> ConfigT:
    """Build *config_type* from parsed flags, then env vars, then defaults; validate it."""
    values: dict[str, Any] = {}
    for item in dataclasses.fields(config_type):  # type: ignore[arg-type]
        raw = getattr(args, item.name, None)
        if raw is None and env_name(item.name) in env:
            raw = env[env_name(item.name)]
        if raw is not None:
            values[item.name] = _convert(item, raw)
    config = config_type(**values)
    config.validate()  # type: ignore[attr-defined]
    return config


def _field_kind(item: dataclasses.Field[Any]) -> type:
    return type(item.default)


def _shown(item: dataclasses.Field[Any]) -> str:
    default = item.default
    if isinstance(default, tuple):
        return ",".join(default) or "none"
    return repr(default) if default != "" else "unset"


def _convert(item: dataclasses.Field[Any], raw: str | bool | Sequence[str]) -> Any:
    kind = _field_kind(item)
    if kind is tuple:
        values = [raw] if isinstance(raw, str) else list(raw)  # type: ignore[arg-type]
        parts = [part.strip() for value in values for part in value.split(",")]
        return tuple(part for part in parts if part)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off", ""):
            return False
        _bad(item.name, raw, "true or false")
    try:
        return kind(raw)
    except ValueError:
        _bad(item.name, raw, f"a value of type {kind.__name__}")
    raise AssertionError("unreachable")
