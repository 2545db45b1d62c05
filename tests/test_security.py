"""The gRPC port's security: TLS, mutual TLS, the shared token, the listen warning, and
start-up errors of bad security options. Certificates are generated in the test."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.client import Client as NatsClient
from order_sidecar.cli import build_parser
from order_sidecar.cli.status import StatusConfig, fetch_status
from order_sidecar.core.errors import ConfigError, Unauthenticated, Unavailable
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig, from_sources
from order_sidecar.runtime.security import Secret, load_secrets, server_credentials, warn_if_exposed
from order_sidecar_client import AsyncSidecarClient, Event, RetryPolicy, SidecarClient
from order_sidecar_client import SidecarError as ClientError
from ordersidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

from tests.support.helpers import message_count, request
from tests.support.tls_certs import Pki, make_pki

ONCE = RetryPolicy(attempts=1, attempt_timeout=5.0)
TOKEN = "tok-3f9a1c2e7b5d4a60"
HEALTHCHECK = Path(__file__).resolve().parent.parent / "deploy" / "docker" / "healthcheck.py"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with a server (localhost, 127.0.0.1) and a client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA: its certificates must be refused."""
    return make_pki(tmp_path_factory.mktemp("other-pki"), "other")


async def started(config: ServeConfig) -> SidecarApp:
    sidecar = SidecarApp(config)
    await sidecar.start()
    return sidecar


@pytest.fixture
async def tls_app(serve_config: ServeConfig, pki: Pki) -> AsyncIterator[SidecarApp]:
    """A sidecar with TLS on its gRPC port."""
    config = dataclasses.replace(
        serve_config, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)
    )
    sidecar = await started(config)
    yield sidecar
    await sidecar.stop()


@pytest.fixture
async def mtls_app(serve_config: ServeConfig, pki: Pki) -> AsyncIterator[SidecarApp]:
    """A sidecar that requires client certificates signed by the test CA."""
    config = dataclasses.replace(
        serve_config,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
    )
    sidecar = await started(config)
    yield sidecar
    await sidecar.stop()


@pytest.fixture
async def token_app(serve_config: ServeConfig, tmp_path: Path) -> AsyncIterator[SidecarApp]:
    """A plaintext sidecar that requires the shared token (read from a file)."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # the trailing newline editors add is not part of it
    sidecar = await started(dataclasses.replace(serve_config, auth_token_file=str(token_file)))
    yield sidecar
    await sidecar.stop()


def event(entity_id: str) -> Event:
    return Event("patient", entity_id, "update", b"{}")


async def publish_code(client: AsyncSidecarClient, entity_id: str) -> grpc.StatusCode:
    """OK, or the status the publish failed with."""
    try:
        await client.publish(event(entity_id))
    except ClientError as error:
        return error.code
    return grpc.StatusCode.OK


async def test_tls_port_refuses_plaintext_and_serves_tls(
    tls_app: SidecarApp, pki: Pki, other_pki: Pki, nc: NatsClient
) -> None:
    async with AsyncSidecarClient(tls_app.target, ONCE) as plain:
        assert await publish_code(plain, "plain") == grpc.StatusCode.UNAVAILABLE
    async with AsyncSidecarClient(tls_app.target, ONCE, tls_ca=other_pki.ca) as untrusted:
        assert await publish_code(untrusted, "untrusted") == grpc.StatusCode.UNAVAILABLE
    async with AsyncSidecarClient(tls_app.target, ONCE, tls_ca=pki.ca) as client:
        published = await client.publish(event("tls"))
    assert published.sequence == 1
    assert await message_count(nc, tls_app.config.stream) == 1  # only the TLS client's


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    mtls_app: SidecarApp, pki: Pki, other_pki: Pki, nc: NatsClient
) -> None:
    target = mtls_app.target
    async with AsyncSidecarClient(target, ONCE, tls_ca=pki.ca) as no_cert:
        assert await publish_code(no_cert, "no-cert") == grpc.StatusCode.UNAVAILABLE
    foreign: dict[str, Any] = {"tls_cert": other_pki.client_cert, "tls_key": other_pki.client_key}
    async with AsyncSidecarClient(target, ONCE, tls_ca=pki.ca, **foreign) as stranger:
        assert await publish_code(stranger, "foreign-cert") == grpc.StatusCode.UNAVAILABLE
    mine: dict[str, Any] = {"tls_cert": pki.client_cert, "tls_key": pki.client_key}
    async with AsyncSidecarClient(target, ONCE, tls_ca=pki.ca, **mine) as client:
        assert await publish_code(client, "with-cert") == grpc.StatusCode.OK
    assert await message_count(nc, mtls_app.config.stream) == 1


async def test_sync_client_speaks_mutual_tls_with_a_token(
    serve_config: ServeConfig, pki: Pki, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = dataclasses.replace(
        serve_config,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
        auth_token_file=str(token_file),
    )
    sidecar = await started(config)
    files: dict[str, Any] = {
        "tls_ca": pki.ca,
        "tls_cert": pki.client_cert,
        "tls_key": pki.client_key,
    }

    def publish(token: str | None) -> grpc.StatusCode:
        with SidecarClient(sidecar.target, ONCE, token=token, **files) as client:
            try:
                client.publish(event("sync"))
            except ClientError as error:
                return error.code
        return grpc.StatusCode.OK

    try:
        # The blocking client runs in a thread while this loop serves the sidecar.
        assert await asyncio.to_thread(publish, None) == grpc.StatusCode.UNAUTHENTICATED
        assert await asyncio.to_thread(publish, TOKEN) == grpc.StatusCode.OK
    finally:
        await sidecar.stop()


async def test_token_guards_every_rpc_but_health(token_app: SidecarApp, nc: NatsClient) -> None:
    stream = token_app.config.stream
    async with grpc.aio.insecure_channel(token_app.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            for name, call in every_rpc(stub, metadata).items():
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call()
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                assert "authorization: Bearer" in (refused.value.details() or ""), name
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert await message_count(nc, stream) == 0  # refused calls published nothing
        good = (("authorization", f"Bearer {TOKEN}"),)
        for call in every_rpc(stub, good).values():
            await call()  # each answers OK
        status = await stub.GetStatus(sidecar_pb2.GetStatusRequest(), metadata=good)
        assert TOKEN not in str(status)
    assert await message_count(nc, stream) == 3  # Publish, the batch's and the stream's


def every_rpc(
    stub: sidecar_pb2_grpc.SidecarAsyncStub, metadata: tuple[tuple[str, str], ...]
) -> dict[str, Callable[[], Awaitable[object]]]:
    """One call of each RPC (unary and streaming) with *metadata*, each OK with the token."""

    async def publish() -> object:
        return await stub.Publish(request("a"), metadata=metadata, timeout=5)

    async def batch() -> object:
        events = sidecar_pb2.PublishBatchRequest(events=[request("b")])
        return await stub.PublishBatch(events, metadata=metadata, timeout=5)

    async def stream() -> object:
        tagged = [sidecar_pb2.PublishStreamRequest(tag="1", event=request("c"))]
        return [reply async for reply in stub.PublishStream(iter(tagged), metadata=metadata)]

    async def lease_round() -> object:
        lease = await stub.AcquireLease(
            sidecar_pb2.AcquireLeaseRequest(entity_type="patient", entity_id="d"),
            metadata=metadata,
            timeout=5,
        )
        renew = sidecar_pb2.RenewLeaseRequest(lease_id=lease.lease_id)
        await stub.RenewLease(renew, metadata=metadata, timeout=5)
        release = sidecar_pb2.ReleaseLeaseRequest(lease_id=lease.lease_id)
        return await stub.ReleaseLease(release, metadata=metadata, timeout=5)

    async def status() -> object:
        return await stub.GetStatus(sidecar_pb2.GetStatusRequest(), metadata=metadata, timeout=5)

    return {
        "Publish": publish,
        "PublishBatch": batch,
        "PublishStream": stream,
        "AcquireLease": lease_round,
        "GetStatus": status,
    }


async def test_token_from_the_env_var(
    serve_config: ServeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORDER_SIDECAR_AUTH_TOKEN", TOKEN)
    sidecar = await started(serve_config)
    try:
        async with AsyncSidecarClient(sidecar.target, ONCE) as anonymous:
            assert await publish_code(anonymous, "x") == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncSidecarClient(sidecar.target, ONCE, token=TOKEN) as client:
            assert await publish_code(client, "x") == grpc.StatusCode.OK
    finally:
        await sidecar.stop()


@pytest.mark.parametrize(
    "listen, tls, warned",
    [
        ("0.0.0.0:50051", False, True),
        ("[::]:50051", False, True),
        ("10.1.2.3:50051", False, True),
        ("sidecar.example:50051", False, True),
        ("0.0.0.0:50051", True, False),
        ("127.0.0.1:50051", False, False),
        ("localhost:50051", False, False),
        ("[::1]:50051", False, False),
    ],
)
def test_warning_when_reachable_without_tls(
    listen: str, tls: bool, warned: bool, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    config = ServeConfig(
        listen=listen,
        tls_cert=str(pki.server_cert) if tls else "",
        tls_key=str(pki.server_key) if tls else "",
    )
    with caplog.at_level(logging.WARNING, "order_sidecar.runtime.security"):
        warn_if_exposed(config, load_secrets(config, {}))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert listen in warnings[0].getMessage() and "TLS is off" in warnings[0].getMessage()


async def test_sidecar_on_all_interfaces_warns_once_at_start(
    serve_config: ServeConfig, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "order_sidecar"):
        sidecar = await started(dataclasses.replace(serve_config, listen="0.0.0.0:0"))
        await sidecar.stop()
    exposed = [r for r in caplog.records if "TLS is off" in r.getMessage()]
    assert len(exposed) == 1 and exposed[0].levelno == logging.WARNING


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServeConfig:
    args = build_parser().parse_args(["serve", *argv])
    return from_sources(ServeConfig, args, env or {})


@pytest.fixture
def files(tmp_path: Path, pki: Pki) -> dict[str, str]:
    """Readable files for the option tests: a secret, an empty one, PEMs and a non-PEM."""
    (tmp_path / "secret").write_text("s3cret\n")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "spaced").write_text("two words")
    (tmp_path / "notpem").write_text("hello")
    found = {name: str(tmp_path / name) for name in ("secret", "empty", "spaced", "notpem")}
    return {**found, "cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca)}


@pytest.mark.parametrize(
    "argv, complaint",
    [
        (["--tls-cert", "{cert}"], "--tls-key"),
        (["--tls-client-ca", "{ca}"], "--tls-client-ca is set"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "{key}"], "readable file"),
        (["--auth-token-file", "/nonexistent"], "--auth-token-file"),
        (
            ["--nats-url", "nats://n:4222", "--nats-user", "u", "--nats-token-file", "{secret}"],
            "only one of",
        ),
        (["--nats-user", "u", "--nats-password-file", "{secret}"], "--nats-url"),
        (["--nats-tls-ca", "{ca}"], "--nats-url"),
        (["--redis-url", "redis://r:6379/0", "--redis-tls-ca", "{ca}"], "rediss://"),
        (["--nats-url", "nats://n:4222", "--nats-tls-cert", "{cert}"], "--nats-tls-key"),
        (["--max-streams", "0"], "--max-streams"),
        (["--max-message-bytes", "10"], "--max-message-bytes"),
    ],
)
def test_bad_security_options_name_the_option(
    argv: list[str], complaint: str, files: dict[str, str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse([arg.format(**files) for arg in argv])
    assert complaint in str(caught.value)


@pytest.mark.parametrize(
    "argv, env, complaint",
    [
        (["--auth-token-file", "{empty}"], {}, "is empty"),
        (["--auth-token-file", "{spaced}"], {}, "printable ASCII"),
        (["--auth-token-file", "{secret}"], {"ORDER_SIDECAR_AUTH_TOKEN": "x"}, "not both"),
        (["--nats-url", "nats://n:4222", "--nats-user", "u"], {}, "--nats-password-file"),
        (["--nats-url", "nats://n:4222", "--nats-password-file", "{secret}"], {}, "--nats-user"),
        ([], {"ORDER_SIDECAR_NATS_TOKEN": "t"}, "--nats-url"),
        (["--redis-url", "redis://r/0", "--redis-username", "u"], {}, "--redis-password-file"),
    ],
)
def test_bad_secrets_stop_the_start(
    argv: list[str], env: dict[str, str], complaint: str, files: dict[str, str]
) -> None:
    config = parse([arg.format(**files) for arg in argv], env)
    with pytest.raises(ConfigError) as caught:
        load_secrets(config, env)
    assert complaint in str(caught.value)
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("broken", ["cert", "key", "client_ca"])
def test_unusable_certificate_is_a_start_up_error(broken: str, files: dict[str, str]) -> None:
    chosen = {"cert": files["cert"], "key": files["key"], "client_ca": files["ca"]}
    chosen[broken] = files["notpem"]
    config = parse(
        [
            "--tls-cert",
            chosen["cert"],
            "--tls-key",
            chosen["key"],
            "--tls-client-ca",
            chosen["client_ca"],
        ]
    )
    with pytest.raises(ConfigError, match="cannot use --tls-"):
        server_credentials(config)


def test_secret_values_hide_themselves(files: dict[str, str]) -> None:
    config = parse(["--auth-token-file", files["secret"]])
    secrets = load_secrets(config, {})
    assert secrets.auth_token is not None and secrets.auth_token.reveal() == "s3cret"
    shown = f"{secrets} {secrets.auth_token} {secrets!r}"
    assert "s3cret" not in shown and "***" in shown
    assert repr(Secret("x")) == "Secret('***')"


def test_help_shows_no_secret_from_the_environment() -> None:
    env = {"ORDER_SIDECAR_AUTH_TOKEN": TOKEN, "ORDER_SIDECAR_NATS_PASSWORD": "pw-9d8c7b6a"}
    shown = subprocess.run(
        [sys.executable, "-m", "order_sidecar.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    ).stdout
    assert "--auth-token-file" in shown and "--tls-client-ca" in shown  # the options are there
    assert TOKEN not in shown and "pw-9d8c7b6a" not in shown


# -- the operators' tools against a sidecar with TLS: `status` and the image's health check --


async def status_of(
    target: str, argv: list[str], env: dict[str, str] | None = None
) -> sidecar_pb2.SidecarStatus:
    """GetStatus as ``order-sidecar status --target TARGET ARGV`` asks it, with *env*."""
    args = build_parser().parse_args(["status", "--target", target, *argv])
    return await fetch_status(from_sources(StatusConfig, args, env or {}), env or {})


def healthcheck(target: str, env: dict[str, str]) -> tuple[int, str]:
    """Exit status and output of deploy/docker/healthcheck.py with the sidecar's *env*."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_SIDECAR_")}
    done = subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--timeout", "3", "--target", target],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, **env},
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def run_cli(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``order-sidecar ARGV`` in a child process, without the ORDER_SIDECAR_* env."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_SIDECAR_")}
    return subprocess.run(
        [sys.executable, "-m", "order_sidecar.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean,
        check=False,
    )


async def test_status_and_health_check_speak_tls(
    tls_app: SidecarApp, pki: Pki, other_pki: Pki
) -> None:
    target, ca = tls_app.target, str(pki.ca)
    assert (await status_of(target, ["--tls-ca", ca])).stream == tls_app.config.stream
    env_status = await status_of(target, [], {"ORDER_SIDECAR_TLS_CA": ca})
    assert env_status.stream == tls_app.config.stream
    for argv in (
        [],  # plaintext against TLS
        ["--tls-ca", str(other_pki.ca)],
        ["--tls-ca", ca, "--tls-server-name", "sidecar.example"],  # not in the certificate
    ):
        with pytest.raises(Unavailable):
            await status_of(target, argv)
    assert (await status_of(target, ["--tls-ca", ca, "--tls-server-name", "localhost"])).stream

    # The health check reads the sidecar's own env: ORDER_SIDECAR_TLS_CERT turns TLS on.
    sidecar_env = {
        "ORDER_SIDECAR_TLS_CERT": str(pki.server_cert),
        "ORDER_SIDECAR_TLS_KEY": str(pki.server_key),
        "ORDER_SIDECAR_TLS_CA": ca,
    }
    code, said = await asyncio.to_thread(healthcheck, target, sidecar_env)
    assert (code, said.strip()) == (0, f"{target} is SERVING")
    for changed in (
        {"ORDER_SIDECAR_TLS_CA": str(other_pki.ca)},
        {"ORDER_SIDECAR_TLS_SERVER_NAME": "sidecar.example"},
        {"ORDER_SIDECAR_TLS_CERT": ""},  # plaintext
    ):
        code, said = await asyncio.to_thread(healthcheck, target, {**sidecar_env, **changed})
        assert code == 1 and "did not answer: UNAVAILABLE" in said, (changed, said)


async def test_status_and_health_check_with_mutual_tls_and_token(
    serve_config: ServeConfig, pki: Pki, other_pki: Pki, tmp_path: Path
) -> None:
    token_file, wrong_file = tmp_path / "token", tmp_path / "wrong"
    token_file.write_text(TOKEN)
    wrong_file.write_text("not-" + TOKEN)
    config = dataclasses.replace(
        serve_config,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
        auth_token_file=str(token_file),
    )
    sidecar = await started(config)
    target, ca = sidecar.target, str(pki.ca)
    client = ["--tls-ca", ca, "--tls-client-cert", str(pki.client_cert)]
    client += ["--tls-client-key", str(pki.client_key)]
    try:
        status = await status_of(target, [*client, "--auth-token-file", str(token_file)])
        assert status.stream == config.stream
        assert (await status_of(target, client, {"ORDER_SIDECAR_AUTH_TOKEN": TOKEN})).stream
        for argv in (client, [*client, "--auth-token-file", str(wrong_file)]):
            with pytest.raises(Unauthenticated, match="--auth-token-file"):
                await status_of(target, argv)
        with pytest.raises(Unavailable):  # the token alone does not pass mutual TLS
            await status_of(target, ["--tls-ca", ca, "--auth-token-file", str(token_file)])

        # The CLI prints the table, or exits 2 saying what is missing.
        cli = ["status", "--target", target, *client]
        shown = await asyncio.to_thread(run_cli, [*cli, "--auth-token-file", str(token_file)])
        assert shown.returncode == 0 and config.stream in shown.stdout, shown
        refused = await asyncio.to_thread(run_cli, cli)
        assert refused.returncode == 2 and "refused GetStatus" in refused.stderr, refused

        # The health check needs no token, but mutual TLS needs a client certificate.
        sidecar_env = {
            "ORDER_SIDECAR_TLS_CERT": str(pki.server_cert),
            "ORDER_SIDECAR_TLS_KEY": str(pki.server_key),
            "ORDER_SIDECAR_TLS_CLIENT_CA": ca,
            "ORDER_SIDECAR_AUTH_TOKEN_FILE": str(token_file),
            "ORDER_SIDECAR_TLS_CA": ca,
        }
        code, said = await asyncio.to_thread(healthcheck, target, sidecar_env)
        assert code == 1 and "ORDER_SIDECAR_TLS_CLIENT_CERT" in said, said
        probe = {
            "ORDER_SIDECAR_TLS_CLIENT_CERT": str(pki.client_cert),
            "ORDER_SIDECAR_TLS_CLIENT_KEY": str(pki.client_key),
        }
        code, said = await asyncio.to_thread(healthcheck, target, {**sidecar_env, **probe})
        assert (code, said.strip()) == (0, f"{target} is SERVING")
        foreign = {
            "ORDER_SIDECAR_TLS_CLIENT_CERT": str(other_pki.client_cert),
            "ORDER_SIDECAR_TLS_CLIENT_KEY": str(other_pki.client_key),
        }
        code, said = await asyncio.to_thread(healthcheck, target, {**sidecar_env, **foreign})
        assert code == 1 and "UNAVAILABLE" in said, said
    finally:
        await sidecar.stop()


@pytest.mark.parametrize(
    "argv, complaint",
    [
        (["--tls-client-cert", "{cert}"], "--tls-client-key"),
        (["--tls-ca", "/nonexistent.pem"], "--tls-ca / ORDER_SIDECAR_TLS_CA"),
        (["--auth-token-file", "/nonexistent"], "--auth-token-file"),
    ],
)
def test_bad_status_options_name_the_option(
    argv: list[str], complaint: str, files: dict[str, str]
) -> None:
    args = build_parser().parse_args(["status", *[arg.format(**files) for arg in argv]])
    with pytest.raises(ConfigError, match=complaint):
        from_sources(StatusConfig, args, {})
