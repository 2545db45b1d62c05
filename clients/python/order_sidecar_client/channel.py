"""Channel security shared by both clients: TLS / mutual TLS and the shared token."""

from __future__ import annotations

from pathlib import Path

import grpc

PathLike = str | Path
Metadata = tuple[tuple[str, str], ...]


def tls_credentials(
    tls: bool, tls_ca: PathLike | None, tls_cert: PathLike | None, tls_key: PathLike | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials when TLS is asked for (*tls* or any file); None for plaintext.

    *tls_ca* verifies the sidecar (system CAs when unset); *tls_cert* and *tls_key*
    are this client's certificate for a sidecar that requires mutual TLS.
    """
    if not (tls or tls_ca or tls_cert or tls_key):
        return None
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert and tls_key go together (mutual TLS)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca),
        private_key=_read(tls_key),
        certificate_chain=_read(tls_cert),
    )


def token_metadata(token: str | None) -> Metadata:
    """Call metadata carrying *token* as the sidecar's --auth-token-file expects it."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _read(path: PathLike | None) -> bytes | None:
    return Path(path).read_bytes() if path else None
