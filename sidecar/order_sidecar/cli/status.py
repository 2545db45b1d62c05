"""``order-sidecar status``: ask a running sidecar for its state and print a table."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.protobuf.json_format import MessageToDict
from order_sidecar_client.channel import tls_credentials, token_metadata
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from order_sidecar.core.errors import ConfigError, Unauthenticated, Unavailable
from order_sidecar.runtime.config import add_arguments, env_name, flag_name, from_sources, option
from order_sidecar.runtime.security import read_secret


@dataclass(frozen=True)
class StatusConfig:
    """Options of ``order-sidecar status`` (docs/security.md: a sidecar with TLS or a token)."""

    target: str = option("127.0.0.1:50051", "sidecar to ask, host:port")
    json: bool = option(False, "print the status as JSON")
    tls: bool = option(False, "speak TLS, verifying the sidecar with the system CAs")
    tls_ca: str = option("", "PEM CA bundle that verifies the sidecar's certificate; turns TLS on")
    tls_client_cert: str = option(
        "", "PEM client certificate, for a sidecar with --tls-client-ca (mutual TLS)"
    )
    tls_client_key: str = option("", "PEM private key of --tls-client-cert")
    tls_server_name: str = option(
        "", "name the sidecar's certificate must carry (default: --target's host)"
    )
    auth_token_file: str = option(
        "",
        "file holding the sidecar's token (or the token itself in ORDER_SIDECAR_AUTH_TOKEN)",
    )

    def validate(self) -> None:
        """Raise ConfigError naming the first unreadable file or a certificate without key."""
        for name in ("tls_ca", "tls_client_cert", "tls_client_key", "auth_token_file"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{_named(name)} = {path!r} is not a readable file")
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise ConfigError(f"set {_named('tls_client_cert')} and {_named('tls_client_key')}")

    @property
    def uses_tls(self) -> bool:
        """Whether the channel speaks TLS."""
        return bool(self.tls or self.tls_ca or self.tls_client_cert or self.tls_server_name)


def _named(name: str) -> str:
    return f"{flag_name(name)} / {env_name(name)}"


def open_channel(config: StatusConfig) -> grpc.aio.Channel:
    """A channel to the sidecar: plaintext, or TLS (mutual TLS with a client certificate)."""
    if not config.uses_tls:
        return grpc.aio.insecure_channel(config.target)
    try:
        credentials = tls_credentials(
            True, config.tls_ca, config.tls_client_cert, config.tls_client_key
        )
    except OSError as error:
        raise ConfigError(f"cannot read a TLS file of status: {error}") from error
    assert credentials is not None
    options = []
    if config.tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.tls_server_name))
    return grpc.aio.secure_channel(config.target, credentials, options)


async def fetch_status(
    config: StatusConfig, env: Mapping[str, str] = os.environ
) -> sidecar_pb2.SidecarStatus:
    """The sidecar's GetStatus answer, sent with the token when there is one.

    Unauthenticated when the sidecar refuses the token; Unavailable when it does not answer
    (wrong port, plaintext against TLS, an untrusted certificate).
    """
    token = read_secret("auth_token", config.auth_token_file, env)
    metadata = token_metadata(token.reveal() if token else None)
    async with open_channel(config) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        try:
            return await stub.GetStatus(
                sidecar_pb2.GetStatusRequest(), metadata=metadata, timeout=5
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(
                    f"sidecar at {config.target} refused GetStatus ({error.details()}): give "
                    f"its token with {flag_name('auth_token_file')} or "
                    f"{env_name('auth_token')}"
                ) from error
            raise Unavailable(
                f"sidecar at {config.target} did not answer: {error.details()}"
            ) from error


def format_status(status: sidecar_pb2.SidecarStatus, as_json: bool) -> str:
    """A two-column table and the last errors, or JSON."""
    if as_json:
        return json.dumps(MessageToDict(status, preserving_proto_field_name=True), indent=2)
    rows = [
        ("producer", status.producer_id),
        ("version", status.version),
        ("uptime", f"{status.uptime_seconds:.0f}s"),
        ("stream", status.stream),
        ("nats", "connected" if status.nats_connected else "DISCONNECTED"),
        ("lock backend", f"{status.lock_backend} ({'up' if status.lock_backend_up else 'DOWN'})"),
        ("locks held", str(status.locks_held)),
        ("leases", str(status.leases)),
        ("entities busy", str(status.entities_busy)),
        ("queued behind an entity", str(status.queue_waiting)),
        ("requests in flight", str(status.requests_in_flight)),
        ("published", str(status.published)),
        ("duplicates", str(status.duplicates)),
        ("fenced by the broker", str(status.fenced)),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)}  {value}" for name, value in rows]
    lines.append("")
    lines.append(f"last errors ({len(status.last_errors)}):" if status.last_errors else "no errors")
    for error in status.last_errors:
        at = error.at.ToDatetime().strftime("%H:%M:%S")
        lines.append(f"  {at} {error.rpc} {error.code} {error.entity_type}: {error.message}")
    return "\n".join(lines)


HELP = "print a running sidecar's state: backends, locks, queues, last errors"
DESCRIPTION = "Ask a running sidecar (GetStatus) and print its state."


def configure(parser: argparse.ArgumentParser) -> None:
    """Add status's options."""
    add_arguments(parser, StatusConfig)


def run(args: argparse.Namespace) -> int:
    """Ask the sidecar and print its answer."""
    config = from_sources(StatusConfig, args, os.environ)
    print(format_status(asyncio.run(fetch_status(config)), config.json))
    return 0
