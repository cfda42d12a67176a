"""The one place where a whole-RPC failure becomes a gRPC status.

InvalidRequest carries google.rpc.BadRequest field violations in the status details
(grpc-status-details-bin), readable with grpc_status.rpc_status.from_call in any
language. Unexpected exceptions become INTERNAL with no text: their details stay in the
(redacted) log.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .errors import GatewayError, InvalidRequest, PermissionDenied, ShuttingDown, Unauthenticated

log = logging.getLogger(__name__)

_CODES: dict[type[GatewayError], int] = {
    InvalidRequest: code_pb2.INVALID_ARGUMENT,
    Unauthenticated: code_pb2.UNAUTHENTICATED,
    PermissionDenied: code_pb2.PERMISSION_DENIED,
    ShuttingDown: code_pb2.UNAVAILABLE,
}


def to_status(error: GatewayError) -> grpc.Status:
    """A GatewayError as a rich gRPC status."""
    status = status_pb2.Status(code=_CODES.get(type(error), code_pb2.UNKNOWN), message=str(error))
    if isinstance(error, InvalidRequest):
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.violations
                ]
            )
        )
        status.details.append(detail)
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext[object, object], error: BaseException) -> NoReturn:
    """End the RPC for `error`: its status if expected, else INTERNAL (and a log line)."""
    if isinstance(error, GatewayError):
        await context.abort_with_status(to_status(error))
    log.error("unexpected error in RPC", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
