"""The shared-token check on every RPC but health (``--auth-token-file``)."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from order_sidecar.core.errors import SidecarError, Unauthenticated
from order_sidecar.rpc.status import abort_rpc

log = logging.getLogger(__name__)

# Kubernetes' gRPC probes and load balancers cannot send a token; health says nothing secret.
OPEN_METHODS_PREFIX = "/grpc.health.v1.Health/"


class Token(Protocol):
    """A secret that shows its value only when asked (``runtime.security.Secret``)."""

    def reveal(self) -> str:
        """The secret's value."""
        ...


if TYPE_CHECKING:  # grpc's classes are generic only in the type stubs
    Continuation = Callable[
        [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
    ]


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health checks without ``authorization: Bearer <token>``."""

    def __init__(self, token: Token) -> None:
        self._expected = _digest(f"Bearer {token.reveal()}")

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Pass the call on when its token matches; else answer UNAUTHENTICATED."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHODS_PREFIX):
            return handler
        presented = [
            value
            for key, value in handler_call_details.invocation_metadata or ()
            if key == "authorization" and isinstance(value, str)
        ]
        # Compare digests in constant time: neither the token nor its length leaks.
        if any(hmac.compare_digest(_digest(value), self._expected) for value in presented):
            return handler
        log.info("refused %s: %s token", method, "wrong" if presented else "no")
        return _refusing(
            handler,
            Unauthenticated(
                f"{'wrong' if presented else 'missing'} token: send metadata "
                "'authorization: Bearer <token>' with the sidecar's --auth-token-file token"
            ),
        )


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def _refusing(
    handler: grpc.RpcMethodHandler[Any, Any], error: SidecarError
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of *handler*'s kind that ends the call with *error*, reading nothing."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await abort_rpc(context, error)

    serializers: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **serializers)
    return grpc.unary_unary_rpc_method_handler(refuse, **serializers)


def server_interceptors(token: Token | None) -> list[grpc.aio.ServerInterceptor]:
    """The token check when a token is configured; none otherwise."""
    return [TokenCheck(token)] if token else []
