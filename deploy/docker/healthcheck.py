#!/usr/bin/env python3
"""Health check of the sidecar, run inside its container (Docker HEALTHCHECK, Kubernetes
exec probes): ask the standard ``grpc.health.v1`` service on the sidecar's own port.

Exit status 0 when healthy, 1 otherwise, with the reason on stdout.

- default (readiness): the sidecar answers SERVING, i.e. NATS - and, with
  ``--on-lock-unavailable reject``, the lock backend - is reachable.
- ``--live`` (liveness): the sidecar answers at all, SERVING or NOT_SERVING. A NATS outage
  makes the sidecar NOT_SERVING until NATS is back; restarting it would not help, so
  liveness must not fail for that - only for a sidecar that no longer answers.

The target is ``--target``, else the address the sidecar itself listens on
(``ORDER_SIDECAR_LISTEN``, wildcard hosts mapped to loopback), else 127.0.0.1:50051. It
runs in the sidecar's network namespace, so the gRPC port can stay on localhost: a
kubelet ``grpc:`` probe would dial the pod IP instead.

TLS follows the sidecar's own env: with ``ORDER_SIDECAR_TLS_CERT`` set the sidecar speaks
TLS, and so does the check, verifying it with ``ORDER_SIDECAR_TLS_CA`` (else the system
CAs) against ``ORDER_SIDECAR_TLS_SERVER_NAME`` (else the target's host). A sidecar with
``ORDER_SIDECAR_TLS_CLIENT_CA`` (mutual TLS) accepts no handshake without a client
certificate: give the check its own in ``ORDER_SIDECAR_TLS_CLIENT_CERT`` and
``ORDER_SIDECAR_TLS_CLIENT_KEY``. It never borrows the sidecar's server certificate (its
key usage may exclude client authentication, and the client CA may be another CA). These
are the env vars of ``order-sidecar status``'s options, so one set serves both. Health
checks need no token (``--auth-token-file`` exempts them).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from order_sidecar_client.channel import tls_credentials

DEFAULT_TARGET = "127.0.0.1:50051"
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def default_target(env: dict[str, str]) -> str:
    """Where the sidecar of this container listens, as a dialable address."""
    listen = env.get("ORDER_SIDECAR_LISTEN", "") or DEFAULT_TARGET
    host, _, port = listen.rpartition(":")
    if host in _WILDCARDS:
        host = "127.0.0.1"
    return f"{host}:{port}"


class Tls(NamedTuple):
    """How the check speaks TLS to its sidecar, from the sidecar's env and the flags (a
    NamedTuple: the deploy tests load this script without registering it as a module)."""

    ca: str = ""
    client_cert: str = ""
    client_key: str = ""
    server_name: str = ""


def tls_from(args: argparse.Namespace, env: Mapping[str, str]) -> Tls | None:
    """TLS settings when the sidecar speaks TLS (``ORDER_SIDECAR_TLS_CERT``); else None.

    ValueError, with what to set, when the sidecar requires a client certificate that the
    check does not have.
    """
    if not (args.tls or env.get("ORDER_SIDECAR_TLS_CERT")):
        return None
    tls = Tls(
        args.tls_ca or env.get("ORDER_SIDECAR_TLS_CA", ""),
        args.tls_client_cert or env.get("ORDER_SIDECAR_TLS_CLIENT_CERT", ""),
        args.tls_client_key or env.get("ORDER_SIDECAR_TLS_CLIENT_KEY", ""),
        args.tls_server_name or env.get("ORDER_SIDECAR_TLS_SERVER_NAME", ""),
    )
    if env.get("ORDER_SIDECAR_TLS_CLIENT_CA") and not (tls.client_cert and tls.client_key):
        raise ValueError(
            "the sidecar requires client certificates (ORDER_SIDECAR_TLS_CLIENT_CA): give the "
            "check one signed by that CA in ORDER_SIDECAR_TLS_CLIENT_CERT and "
            "ORDER_SIDECAR_TLS_CLIENT_KEY"
        )
    return tls


def open_channel(target: str, tls: Tls | None) -> grpc.Channel:
    """A plaintext or TLS channel to *target*."""
    if tls is None:
        return grpc.insecure_channel(target)
    credentials = tls_credentials(True, tls.ca, tls.client_cert, tls.client_key)
    assert credentials is not None
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(target, credentials, options)


def check(target: str, live: bool, timeout: float, tls: Tls | None = None) -> tuple[bool, str]:
    """(healthy, why) for the sidecar at *target*."""
    try:
        with open_channel(target, tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        return False, f"{target} did not answer: {code.name if code else error}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    healthy = live or reply.status == health_pb2.HealthCheckResponse.SERVING
    return healthy, f"{target} is {status}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The script's options."""
    parser = argparse.ArgumentParser(description="gRPC health check of the order sidecar.")
    parser.add_argument("--target", default="", help="sidecar host:port (default: its listen)")
    parser.add_argument("--live", action="store_true", help="liveness: any answer is healthy")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")
    parser.add_argument(
        "--tls", action="store_true", help="speak TLS (default: if ORDER_SIDECAR_TLS_CERT is set)"
    )
    for name, what in (
        ("ca", "PEM CA that verifies the sidecar"),
        ("client-cert", "PEM client certificate, for a sidecar with mutual TLS"),
        ("client-key", "PEM key of --tls-client-cert"),
        ("server-name", "name the sidecar's certificate must carry"),
    ):
        variable = "ORDER_SIDECAR_TLS_" + name.replace("-", "_").upper()
        parser.add_argument(f"--tls-{name}", default="", help=f"{what} (default: ${variable})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    env = dict(os.environ)
    target = args.target or default_target(env)
    try:
        healthy, why = check(target, args.live, args.timeout, tls_from(args, env))
    except (OSError, ValueError) as error:  # unreadable PEM files, a missing client cert
        healthy, why = False, f"cannot check {target}: {error}"
    print(why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
