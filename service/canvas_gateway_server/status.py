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


MAX_DETAILED_VIOLATIONS = 25
"""Violations carried in the status details. They travel in a trailer, and clients refuse
trailers over 8-16 KB (as RESOURCE_EXHAUSTED, losing the real status), so the rest are
only counted in the message."""


def to_status(error: GatewayError) -> grpc.Status:
    """A GatewayError as a rich gRPC status."""
    message = str(error)
    status = status_pb2.Status(code=_CODES.get(type(error), code_pb2.UNKNOWN))
    if isinstance(error, InvalidRequest):
        shown = error.violations[:MAX_DETAILED_VIOLATIONS]
        if len(error.violations) > len(shown):
            message += f"; the details list the first {len(shown)} of {len(error.violations)} violations"
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in shown
                ]
            )
        )
        status.details.append(detail)
    status.message = message
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext[object, object], error: BaseException) -> NoReturn:
    """End the RPC for `error`: its status if expected, else INTERNAL (and a log line)."""
    if isinstance(error, GatewayError):
        await context.abort_with_status(to_status(error))
    log.error("unexpected error in RPC", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
