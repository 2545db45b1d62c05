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
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def default_target(env: dict[str, str]) -> str:
    """Where the sidecar of this container listens, as a dialable address."""
    listen = env.get("ORDER_SIDECAR_LISTEN", "") or DEFAULT_TARGET
    host, _, port = listen.rpartition(":")
    if host in _WILDCARDS:
        host = "127.0.0.1"
    return f"{host}:{port}"


def check(target: str, live: bool, timeout: float) -> tuple[bool, str]:
    """(healthy, why) for the sidecar at *target*."""
    try:
        with grpc.insecure_channel(target) as channel:
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    target = args.target or default_target(dict(os.environ))
    healthy, why = check(target, args.live, args.timeout)
    print(why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
