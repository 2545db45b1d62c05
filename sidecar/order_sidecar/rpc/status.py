"""The one edge where errors become gRPC statuses: a table from error kinds to codes.

Every aborted RPC and every per-event status in a batch or stream goes through
:func:`grpc_status`; nothing else in the sidecar picks a status code.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from order_sidecar.core.errors import ErrorKind, SidecarError, internal_error

STATUS_OF_KIND: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorKind.CONFIG: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.LIMIT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.CONFLICT: grpc.StatusCode.ABORTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def status_code(error: SidecarError) -> grpc.StatusCode:
    """The status code of *error*'s kind."""
    return STATUS_OF_KIND[error.kind]


def grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a caller should see for *error*."""
    known = internal_error(error)
    return status_code(known), str(known)


async def abort_rpc(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> NoReturn:
    """End the RPC with *error*'s status: the one way RPCs are aborted."""
    code, message = grpc_status(error)
    await context.abort(code, message)
    raise AssertionError("context.abort returned")
