"""Security plumbing: secrets, gRPC TLS and the token check, NATS and Redis credentials.

Secrets come from files or env vars only (never a flag's value, which ``ps`` shows) and
travel as :class:`Secret`, whose repr hides the value, so no log line, error message or
GetStatus answer can carry one. docs/security.md describes every option.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nkeys
import redis.exceptions
from redis.asyncio import Redis

from order_sidecar.core.errors import ConfigError
from order_sidecar.runtime.config import SecurityOptions, ServeConfig, env_name, flag_name
from order_sidecar.telemetry.logs import redact_url

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII: it travels in gRPC metadata


class Secret:
    """A secret value that does not show itself in repr, str or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The value, for the one place that hands it to a library."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True)
class Secrets:
    """The secrets a sidecar uses, read once at start-up."""

    auth_token: Secret | None = None
    nats_password: Secret | None = None
    nats_token: Secret | None = None
    redis_password: Secret | None = None


def load_secrets(config: ServeConfig, env: Mapping[str, str]) -> Secrets:
    """Read every secret from its file (``--X-file``) or env var (``ORDER_SIDECAR_X``).

    Raises ConfigError naming the option when a file is unreadable or empty, both sources
    are set, or a secret lacks its partner (e.g. --nats-user without a password).
    """
    secrets = Secrets(
        auth_token=read_secret("auth_token", config.auth_token_file, env),
        nats_password=read_secret("nats_password", config.nats_password_file, env),
        nats_token=read_secret("nats_token", config.nats_token_file, env),
        redis_password=read_secret("redis_password", config.redis_password_file, env),
    )
    if secrets.auth_token and not _TOKEN.fullmatch(secrets.auth_token.reveal()):
        raise ConfigError(
            f"the token of {flag_name('auth_token_file')} / {env_name('auth_token')} must be "
            "printable ASCII without spaces: it travels in gRPC metadata"
        )
    if bool(config.nats_user) != bool(secrets.nats_password):
        raise ConfigError(
            f"set {flag_name('nats_user')} together with {flag_name('nats_password_file')} "
            f"(or {env_name('nats_password')})"
        )
    if secrets.nats_token and (
        config.nats_user or config.nats_nkey_seed_file or config.nats_creds_file
    ):
        raise ConfigError(
            f"a NATS token ({env_name('nats_token')}) conflicts with {flag_name('nats_user')} "
            f"or {flag_name('nats_nkey_seed_file')}: use one NATS authentication"
        )
    if (secrets.nats_token or secrets.nats_password) and not config.nats_url:
        raise ConfigError(
            f"NATS credentials need {flag_name('nats_url')}: the embedded nats-server takes none"
        )
    if config.redis_username and not secrets.redis_password:
        raise ConfigError(
            f"{flag_name('redis_username')} needs {flag_name('redis_password_file')} "
            f"(or {env_name('redis_password')})"
        )
    if config.nats_nkey_seed_file:
        name = "nats_nkey_seed_file"
        _check_user_seed(name, _read(config.nats_nkey_seed_file, name))
    if config.nats_creds_file:
        _check_creds(config.nats_creds_file)
    return secrets


def _read(path: str, name: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeError) as error:
        raise ConfigError(
            f"cannot read {flag_name(name)} {path!r}: {type(error).__name__}"
        ) from error


def _check_user_seed(name: str, text: str) -> None:
    """Raise ConfigError unless *text* is one NKey user seed ('SU...'); never shows it."""
    try:
        prefix, _ = nkeys.decode_seed(bytearray(text.strip().encode()))
    except (nkeys.NkeysError, ValueError) as error:
        raise ConfigError(
            f"{flag_name(name)} holds no valid NKey seed ({error}): expected one line "
            "starting 'SU', as 'nsc' or 'nk -gen user' write it"
        ) from error
    if prefix != nkeys.PREFIX_BYTE_USER:
        raise ConfigError(f"{flag_name(name)} holds an NKey seed, but not a user's ('SU...')")


def _check_creds(path: str) -> None:
    """Raise ConfigError unless *path* holds a user JWT and a user seed (nats-py would hang
    on a file without the JWT)."""
    lines = [line.strip() for line in _read(path, "nats_creds_file").splitlines()]
    blocks: dict[str, str] = {}
    for index, line in enumerate(lines[:-1]):
        for marker in ("NATS USER JWT", "USER NKEY SEED"):
            if line.startswith("-----BEGIN") and marker in line:
                blocks[marker] = lines[index + 1]
    if not blocks.get("NATS USER JWT", "").startswith("ey"):
        raise ConfigError(
            f"{flag_name('nats_creds_file')} {path!r} holds no '-----BEGIN NATS USER JWT-----' "
            "block: expected a credentials file as 'nsc generate creds' writes it"
        )
    _check_user_seed("nats_creds_file", blocks.get("USER NKEY SEED", ""))


def read_secret(name: str, path: str, env: Mapping[str, str]) -> Secret | None:
    """The secret *name* from *path* (its ``--NAME-file``) or env var ``ORDER_SIDECAR_NAME``;
    None when neither is set. ConfigError when both are, or the file is unreadable or empty."""
    flag, variable = flag_name(name + "_file"), env_name(name)
    if path and env.get(variable):
        raise ConfigError(f"set {flag} or {variable}, not both")
    if not path:
        value = env.get(variable, "").strip()
        return Secret(value) if value else None
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as error:
        raise ConfigError(f"cannot read {flag} {path!r}: {type(error).__name__}") from error
    if not value:
        raise ConfigError(f"{flag} {path!r} is empty")
    return Secret(value)


def is_loopback(host: str) -> bool:
    """Whether *host* (from host:port, brackets allowed) only reaches this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(config: ServeConfig, secrets: Secrets) -> None:
    """Log one WARNING when the gRPC port is reachable from other hosts without TLS."""
    if config.tls_cert or is_loopback(config.listen.rpartition(":")[0]):
        return
    log.warning(
        "--listen %s is reachable from other hosts and TLS is off: anyone who reaches it can "
        "publish%s. Set --tls-cert and --tls-key (and --tls-client-ca or --auth-token-file), "
        "or listen on 127.0.0.1",
        config.listen,
        ", and the token travels in clear text" if secrets.auth_token else "",
    )


def server_credentials(options: SecurityOptions) -> grpc.ServerCredentials | None:
    """TLS (mutual TLS with --tls-client-ca) credentials for the gRPC port; None: plaintext."""
    if not options.tls_cert:
        return None
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load(check, "tls_cert", options.tls_cert, options.tls_key)
    client_ca = None
    if options.tls_client_ca:
        _load(check, "tls_client_ca", options.tls_client_ca)
        client_ca = Path(options.tls_client_ca).read_bytes()
    return grpc.ssl_server_credentials(
        [(Path(options.tls_key).read_bytes(), Path(options.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _load(context: ssl.SSLContext, name: str, path: str, key: str = "") -> None:
    """Load PEM files into *context* now, so a bad file is a start-up error naming it."""
    try:
        if key:
            context.load_cert_chain(path, key)
        else:
            context.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as error:
        what = f"{flag_name(name)} {path!r}" + (f" with key {key!r}" if key else "")
        raise ConfigError(f"cannot use {what}: {error}") from error


def tls_client_context(prefix: str, ca: str, cert: str, key: str) -> ssl.SSLContext:
    """A verifying TLS client context (system CAs unless *ca*), with a client cert if set."""
    context = ssl.create_default_context()
    if ca:
        _load(context, f"{prefix}_ca", ca)
    if cert:
        _load(context, f"{prefix}_cert", cert, key)
    return context


def nats_options(config: ServeConfig, secrets: Secrets) -> dict[str, Any]:
    """Keyword arguments for nats-py's ``connect``: credentials and TLS."""
    options: dict[str, Any] = {}
    if config.nats_user and secrets.nats_password:
        options.update(user=config.nats_user, password=secrets.nats_password.reveal())
    if secrets.nats_token:
        options["token"] = secrets.nats_token.reveal()
    if config.nats_nkey_seed_file:
        options["nkeys_seed"] = config.nats_nkey_seed_file
    if config.nats_creds_file:
        options["user_credentials"] = config.nats_creds_file
    if config.nats_tls_ca or config.nats_tls_cert or config.nats_url.startswith("tls://"):
        options["tls"] = tls_client_context(
            "nats_tls", config.nats_tls_ca, config.nats_tls_cert, config.nats_tls_key
        )
    return options


def redis_options(config: ServeConfig, secrets: Secrets) -> dict[str, Any]:
    """Keyword arguments for redis-py's ``Redis.from_url`` (credentials in a URL win)."""
    options: dict[str, Any] = {}
    if secrets.redis_password:
        options["password"] = secrets.redis_password.reveal()
    if config.redis_username:
        options["username"] = config.redis_username
    if config.redis_tls_ca or config.redis_tls_cert:
        # Checked here so that a bad file is a start-up error, not a failing lock later.
        tls_client_context(
            "redis_tls", config.redis_tls_ca, config.redis_tls_cert, config.redis_tls_key
        )
    if config.redis_tls_ca:
        options["ssl_ca_certs"] = config.redis_tls_ca
    if config.redis_tls_cert:
        options.update(ssl_certfile=config.redis_tls_cert, ssl_keyfile=config.redis_tls_key)
    return options


async def check_redis_credentials(urls: Sequence[str], options: Mapping[str, Any]) -> None:
    """PING every Redis master once: refused credentials stop the start-up (ConfigError);
    an unreachable master does not (--on-lock-unavailable covers outages)."""
    for url in urls:
        client = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2, **options)
        try:
            await client.ping()
        except redis.exceptions.AuthenticationError as error:
            raise ConfigError(
                f"Redis at {redact_url(url)} refused the credentials ({type(error).__name__}): "
                f"check {flag_name('redis_username')} and {flag_name('redis_password_file')}"
            ) from error
        except (redis.exceptions.RedisError, OSError) as error:
            log.warning("Redis at %s does not answer yet: %r", redact_url(url), error)
        finally:
            await client.aclose()
