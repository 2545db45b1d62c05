"""Credentials and TLS towards real NATS and Redis servers started with authentication,
and secrets kept out of the sidecar's logs."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import nats
import nkeys
import pytest
from nats.aio.client import Client as NatsClient
from order_sidecar.core.errors import ConfigError, SidecarError
from order_sidecar.runtime.app import SidecarApp
from order_sidecar.runtime.config import ServeConfig
from order_sidecar_client import AsyncSidecarClient, Event, RetryPolicy

from tests.support.helpers import message_count
from tests.support.servers import NatsServer, RedisServer, SidecarProcess
from tests.support.tls_certs import Pki, make_pki

ONCE = RetryPolicy(attempts=1, attempt_timeout=10.0)
NATS_PASSWORD = "np-51c0ffee7a"
NATS_TOKEN = "nt-8e2d4b6f1c"
REDIS_ADMIN = "ra-93b7d1e5c2"
REDIS_USER_PASSWORD = "ru-0f4a8c2e6d"
TOKEN = "gt-7c1e9a3b5d"


class ConfiguredNats(NatsServer):
    """nats-server from a config file: JetStream plus *extra* (authorization, tls)."""

    def __init__(self, workdir: Path, name: str, extra: str) -> None:
        super().__init__(workdir, name)
        self.extra = extra

    def _command(self) -> list[str]:
        conf = self.workdir / f"{self.name}.conf"
        conf.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'http: "127.0.0.1:{self.monitor_port}"\n'
            f'jetstream {{ store_dir: "{self.store}" }}\n{self.extra}\n'
        )
        return [self.binary, "-c", str(conf)]


class SecuredRedis(RedisServer):
    """redis-server with *extra* arguments (passwords, ACL users, TLS)."""

    def __init__(self, workdir: Path, name: str, extra: list[str], pki: Pki | None = None):
        super().__init__(workdir, name)
        self.extra = extra
        self.pki = pki

    @property
    def url(self) -> str:
        """Client URL: rediss:// with TLS."""
        return f"{'rediss' if self.pki else 'redis'}://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        if not self.pki:
            return [*super()._command(), *self.extra]
        tls = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "yes"]
        files = [
            *("--tls-cert-file", str(self.pki.server_cert)),
            *("--tls-key-file", str(self.pki.server_key)),
            *("--tls-ca-cert-file", str(self.pki.ca)),
        ]
        return [*super()._command(), *self.extra, *tls, *files]

    def is_ready(self) -> bool:
        """Redis answers PING, even if only to ask for a password."""
        try:
            with self._socket() as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16)[:1] in (b"+", b"-")
        except OSError:
            return False

    def _socket(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
        if not self.pki:
            return sock
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        return context.wrap_socket(sock, server_hostname="127.0.0.1")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates for the servers' TLS and the sidecar's client certificate."""
    return make_pki(tmp_path_factory.mktemp("backend-pki"), "backend")


@contextlib.contextmanager
def running(server: NatsServer | RedisServer) -> Iterator[None]:
    server.start()
    try:
        yield
    finally:
        server.kill()


@pytest.fixture(scope="module")
def tls_nats(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[ConfiguredNats]:
    """nats-server requiring TLS and a user with a password."""
    server = ConfiguredNats(
        tmp_path_factory.mktemp("tls-nats"),
        "tls-nats",
        f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}" }}\n'
        f'authorization {{ users = [ {{ user: "sidecar", password: "{NATS_PASSWORD}" }} ] }}',
    )
    with running(server):
        yield server


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredRedis]:
    """redis-server with a default-user password and an ACL user 'sidecar'."""
    server = SecuredRedis(
        tmp_path_factory.mktemp("acl-redis"),
        "acl-redis",
        [
            *("--requirepass", REDIS_ADMIN),
            *("--user", "sidecar", "on", f">{REDIS_USER_PASSWORD}", "~*", "&*", "+@all"),
        ],
    )
    with running(server):
        yield server


def secret_file(folder: Path, name: str, value: str) -> str:
    path = folder / name
    path.write_text(value + "\n")
    return str(path)


@pytest.fixture
async def secure_nc(tls_nats: ConfiguredNats, pki: Pki) -> AsyncIterator[NatsClient]:
    """A NATS connection to the TLS, password-protected server, for looking at streams."""
    client = await nats.connect(
        tls_nats.url,
        user="sidecar",
        password=NATS_PASSWORD,
        tls=ssl.create_default_context(cafile=str(pki.ca)),
    )
    yield client
    await client.close()


async def publish_once(config: ServeConfig) -> int:
    """Start a sidecar on *config*, publish one event through it, stop; its sequence."""
    app = SidecarApp(config)
    try:
        await app.start()
        async with AsyncSidecarClient(app.target, ONCE) as client:
            return (await client.publish(Event("patient", "1", "create", b"{}"))).sequence
    finally:
        await app.stop()


async def test_nats_password_and_tls(
    serve_config: ServeConfig,
    tls_nats: ConfiguredNats,
    pki: Pki,
    tmp_path: Path,
    secure_nc: NatsClient,
) -> None:
    good = dataclasses.replace(
        serve_config,
        nats_url=tls_nats.url,
        nats_user="sidecar",
        nats_password_file=secret_file(tmp_path, "nats-pw", NATS_PASSWORD),
        nats_tls_ca=str(pki.ca),
    )
    assert await publish_once(good) == 1
    assert await message_count(secure_nc, good.stream) == 1
    wrong = secret_file(tmp_path, "wrong", "not-the-password")
    for bad, complaint in (
        (dataclasses.replace(good, nats_password_file=wrong), "Authorization Violation"),
        (dataclasses.replace(good, nats_user="", nats_password_file=""), "Authorization"),
        (dataclasses.replace(good, nats_tls_ca=""), "CERTIFICATE_VERIFY_FAILED"),
    ):
        with pytest.raises(SidecarError) as refused:
            await publish_once(bad)
        assert complaint in str(refused.value), refused.value
        assert NATS_PASSWORD not in str(refused.value)
    assert await message_count(secure_nc, good.stream) == 1


async def test_nats_token(serve_config: ServeConfig, tmp_path: Path) -> None:
    server = ConfiguredNats(tmp_path, "token-nats", f'authorization {{ token: "{NATS_TOKEN}" }}')
    with running(server):
        config = dataclasses.replace(
            serve_config,
            nats_url=server.url,
            nats_token_file=secret_file(tmp_path, "nats-token", NATS_TOKEN),
        )
        assert await publish_once(config) == 1
        with pytest.raises(SidecarError, match="Authorization Violation"):
            await publish_once(dataclasses.replace(config, nats_token_file=""))


def new_key(prefix: int) -> nkeys.KeyPair:
    """A fresh NKey of a kind (nkeys.PREFIX_BYTE_USER, ...): nkeys only decodes seeds, so
    the seed is encoded from 32 random bytes."""
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def public(key: nkeys.KeyPair) -> str:
    return str(key.public_key.decode())


def seed_of(key: nkeys.KeyPair) -> str:
    return bytes(key.seed).decode()


async def test_nats_nkey_seed(serve_config: ServeConfig, tmp_path: Path) -> None:
    user = new_key(nkeys.PREFIX_BYTE_USER)
    server = ConfiguredNats(
        tmp_path, "nkey-nats", f'authorization {{ users = [ {{ nkey: "{public(user)}" }} ] }}'
    )
    with running(server):
        config = dataclasses.replace(
            serve_config,
            nats_url=server.url,
            nats_nkey_seed_file=secret_file(tmp_path, "user.nk", seed_of(user)),
        )
        assert await publish_once(config) == 1
        # Another user's seed: the server refuses the signed nonce.
        stranger = seed_of(new_key(nkeys.PREFIX_BYTE_USER))
        unknown = secret_file(tmp_path, "stranger.nk", stranger)
        with pytest.raises(SidecarError, match="Authorization Violation") as refused:
            await publish_once(dataclasses.replace(config, nats_nkey_seed_file=unknown))
        assert stranger not in str(refused.value)
        # Not a user seed at all: a start-up error naming the option, before connecting.
        account = seed_of(new_key(nkeys.PREFIX_BYTE_ACCOUNT))
        for text, complaint in (
            ("not-a-seed", "holds no valid NKey seed"),
            (account, "not a user's"),
            (public(user), "holds no valid NKey seed"),
        ):
            bad = secret_file(tmp_path, "bad.nk", text)
            with pytest.raises(ConfigError, match=complaint) as wrong:
                await publish_once(dataclasses.replace(config, nats_nkey_seed_file=bad))
            assert "--nats-nkey-seed-file" in str(wrong.value)
            assert text not in str(wrong.value)
        # Without a seed the server refuses the connection.
        with pytest.raises(SidecarError, match="Authorization Violation"):
            await publish_once(dataclasses.replace(config, nats_nkey_seed_file=""))


def signed_jwt(issuer: nkeys.KeyPair, subject: str, claims: dict[str, object]) -> str:
    """A NATS v2 JWT about *subject*, signed by *issuer* (what 'nsc' makes)."""

    def encoded(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    body: dict[str, object] = {
        "jti": "",
        "iat": 1_700_000_000,
        "iss": public(issuer),
        "name": subject[:8],
        "sub": subject,
        "nats": {**claims, "version": 2},
    }
    digest = hashlib.sha256(json.dumps(body).encode()).digest()
    body["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    header = encoded(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = encoded(json.dumps(body).encode())
    signature = encoded(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


def creds(user_jwt: str, user: nkeys.KeyPair) -> str:
    """A credentials file's text, as 'nsc generate creds' writes it."""
    return (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed_of(user)}\n------END USER NKEY SEED------\n"
    )


UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


async def test_nats_creds_file(serve_config: ServeConfig, tmp_path: Path) -> None:
    operator = new_key(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    user = new_key(nkeys.PREFIX_BYTE_USER)
    limits = {
        **UNLIMITED,
        **{"imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1},
        **{"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1},
    }
    account_jwt = signed_jwt(operator, public(account), {"type": "account", "limits": limits})
    # JetStream in operator mode needs a system account.
    system = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    system_jwt = signed_jwt(operator, public(system), {"type": "account"})
    server = ConfiguredNats(
        tmp_path,
        "operator-nats",
        f'operator: "{signed_jwt(operator, public(operator), {"type": "operator"})}"\n'
        f"system_account: {public(system)}\n"
        "resolver: MEMORY\n"
        f'resolver_preload: {{ {public(account)}: "{account_jwt}", '
        f'{public(system)}: "{system_jwt}" }}',
    )
    user_claims = {"type": "user", "pub": {}, "sub": {}, **UNLIMITED}
    with running(server):
        good = creds(signed_jwt(account, public(user), user_claims), user)
        config = dataclasses.replace(
            serve_config,
            nats_url=server.url,
            nats_creds_file=secret_file(tmp_path, "user.creds", good),
        )
        assert await publish_once(config) == 1
        # A user of an account the operator never signed.
        stranger_account = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
        foreign = creds(signed_jwt(stranger_account, public(user), user_claims), user)
        refused_file = secret_file(tmp_path, "foreign.creds", foreign)
        with pytest.raises(SidecarError, match="Authorization Violation"):
            await publish_once(dataclasses.replace(config, nats_creds_file=refused_file))
        # A JWT with the seed of another user: its signature of the nonce does not match.
        other_user = new_key(nkeys.PREFIX_BYTE_USER)
        mismatched = creds(signed_jwt(account, public(user), user_claims), other_user)
        mismatched_file = secret_file(tmp_path, "mismatched.creds", mismatched)
        with pytest.raises(SidecarError, match="Authorization Violation"):
            await publish_once(dataclasses.replace(config, nats_creds_file=mismatched_file))
        # Malformed files are start-up errors naming the option (nats-py would hang on the
        # first: it reads until it finds a JWT).
        for text, complaint in (
            (f"-----BEGIN USER NKEY SEED-----\n{seed_of(user)}\n", "NATS USER JWT"),
            (good.replace(seed_of(user), "SUnot-a-seed"), "holds no valid NKey seed"),
        ):
            bad = secret_file(tmp_path, "bad.creds", text)
            with pytest.raises(ConfigError, match=complaint) as wrong:
                await publish_once(dataclasses.replace(config, nats_creds_file=bad))
            assert "--nats-creds-file" in str(wrong.value)
            assert seed_of(user) not in str(wrong.value)


def test_cli_without_the_nats_password_exits_with_a_clear_error(tls_nats: ConfiguredNats) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "order_sidecar.cli", "serve", f"--nats-url={tls_nats.url}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "error: cannot connect to NATS" in done.stderr


@pytest.mark.parametrize("user", ["sidecar", ""])
async def test_redis_acl_user_or_default_password(
    user: str, serve_config: ServeConfig, acl_redis: SecuredRedis, tmp_path: Path
) -> None:
    password = REDIS_USER_PASSWORD if user else REDIS_ADMIN
    config = dataclasses.replace(
        serve_config,
        redis_url=(acl_redis.url,),
        redis_username=user,
        redis_password_file=secret_file(tmp_path, "redis-pw", password),
        # an OK publish then proves that Redis granted the lock
        on_lock_unavailable="reject",
    )
    assert await publish_once(config) == 1
    wrong = secret_file(tmp_path, "wrong", "nope")
    for bad in (
        dataclasses.replace(config, redis_password_file=wrong),
        dataclasses.replace(config, redis_username="", redis_password_file=""),
    ):
        with pytest.raises(ConfigError, match="refused the credentials") as refused:
            await publish_once(bad)
        assert password not in str(refused.value)


async def test_redis_mutual_tls(serve_config: ServeConfig, pki: Pki, tmp_path: Path) -> None:
    server = SecuredRedis(tmp_path, "tls-redis", [], pki)
    with running(server):
        config = dataclasses.replace(
            serve_config,
            redis_url=(server.url,),
            redis_tls_ca=str(pki.ca),
            redis_tls_cert=str(pki.client_cert),
            redis_tls_key=str(pki.client_key),
            on_lock_unavailable="reject",
        )
        assert await publish_once(config) == 1
        # Without its client certificate the sidecar cannot take a lock: refused, not lost.
        app = SidecarApp(dataclasses.replace(config, redis_tls_cert="", redis_tls_key=""))
        await app.start()
        try:
            async with AsyncSidecarClient(app.target, ONCE) as client:
                with pytest.raises(Exception) as refused:
                    await client.publish(Event("patient", "2", "create", b"{}"))
            assert getattr(refused.value, "code", None) == grpc.StatusCode.UNAVAILABLE
        finally:
            await app.stop()


async def test_no_secret_reaches_the_logs(
    tls_nats: ConfiguredNats,
    acl_redis: SecuredRedis,
    pki: Pki,
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    sidecar = SidecarProcess(
        tmp_path,
        "logged",
        {
            "nats_url": tls_nats.url,
            "nats_user": "sidecar",
            "nats_password_file": secret_file(tmp_path, "nats-pw", NATS_PASSWORD),
            "nats_tls_ca": str(pki.ca),
            "redis_url": acl_redis.url,
            "redis_username": "sidecar",
            "redis_password_file": secret_file(tmp_path, "redis-pw", REDIS_USER_PASSWORD),
            "auth_token_file": secret_file(tmp_path, "token", TOKEN),
            "stream": names["stream"],
            "subject_prefix": names["subject_prefix"],
            "log_format": "json",
            "log_level": "DEBUG",
        },
    )
    sidecar.start()
    try:
        async with AsyncSidecarClient(sidecar.target, ONCE, token=TOKEN) as client:
            assert (await client.publish(Event("patient", "1", "create", b"{}"))).sequence == 1
        async with AsyncSidecarClient(sidecar.target, ONCE, token="guess-" + TOKEN) as guess:
            with pytest.raises(Exception, match="wrong token"):
                await guess.publish(Event("patient", "1", "update", b"{}"))
    finally:
        assert sidecar.terminate() == 0
    logged = sidecar.log_path.read_text()
    assert "token required" in logged and "refused /ordersidecar" in logged  # it did log
    for secret in (NATS_PASSWORD, REDIS_USER_PASSWORD, TOKEN):
        assert secret not in logged
