"""The one place where a whole-RPC failure becomes a gRPC status.

InvalidRequest carries google.rpc.BadRequest field violations in the status details
(grpc-status-details-bin), readable with grpc_status.rpc_status.from_call in any
language. A stream cut short by draining carries a google.rpc.ErrorInfo (domain
ERROR_DOMAIN, reason "DRAINING", or "STREAM_IDLE" for one ended by its idle timeout) whose
metadata "resume_position" says where to resume, and every UNAVAILABLE of a draining gateway
a google.rpc.RetryInfo of 0 s: retry now, elsewhere.
Unexpected exceptions become INTERNAL with the text "internal error" and nothing more: their
details stay in the (redacted) log.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..errors import (
    GatewayError,
    HeaderTimeout,
    InvalidRequest,
    NotAcknowledged,
    NotKept,
    PermissionDenied,
    ResultsUnavailable,
    ShuttingDown,
    StreamIdle,
    TooManyStreams,
    Unauthenticated,
)

log = logging.getLogger(__name__)

_CODES: dict[type[GatewayError], int] = {
    InvalidRequest: code_pb2.INVALID_ARGUMENT,
    Unauthenticated: code_pb2.UNAUTHENTICATED,
    PermissionDenied: code_pb2.PERMISSION_DENIED,
    ShuttingDown: code_pb2.UNAVAILABLE,
    HeaderTimeout: code_pb2.DEADLINE_EXCEEDED,
    StreamIdle: code_pb2.DEADLINE_EXCEEDED,
    TooManyStreams: code_pb2.RESOURCE_EXHAUSTED,
    NotKept: code_pb2.NOT_FOUND,
    ResultsUnavailable: code_pb2.UNAVAILABLE,
    NotAcknowledged: code_pb2.FAILED_PRECONDITION,
}


ERROR_DOMAIN = "canvas-gateway.internal"
"""google.rpc.ErrorInfo.domain of the gateway's own error details (see the proto's SendStream)."""

MAX_DETAIL_BYTES = 3_000
"""Budget for the BadRequest details. They travel base64-encoded in a trailer, and clients
refuse trailers over 8 KB (grpc-java) to 16 KB (grpc-python) with RESOURCE_EXHAUSTED, losing
the real status; violations past the budget are only counted in the message."""
MAX_MESSAGE_CHARS = 500


def to_status(error: GatewayError) -> grpc.Status:
    """A GatewayError as a rich gRPC status."""
    message = str(error)
    status = status_pb2.Status(code=_CODES.get(type(error), code_pb2.UNKNOWN))
    if isinstance(error, InvalidRequest):
        bad_request = error_details_pb2.BadRequest()
        for violation in error.violations:
            entry = error_details_pb2.BadRequest.FieldViolation(
                field=violation.field, description=violation.description
            )
            if (
                bad_request.field_violations
                and bad_request.ByteSize() + entry.ByteSize() + 3 > MAX_DETAIL_BYTES
            ):
                break
            bad_request.field_violations.append(entry)
        shown, total = len(bad_request.field_violations), len(error.violations)
        if shown < total:
            message += f"; the details list the first {shown} of {total} violations"
        _attach(status, bad_request)
    if isinstance(error, StreamIdle):
        position = {"resume_position": str(error.resume_position)}
        idle = error_details_pb2.ErrorInfo(reason="STREAM_IDLE", domain=ERROR_DOMAIN, metadata=position)
        _attach(status, idle)
    if isinstance(error, ShuttingDown):
        # Another instance can take the call at once: retry now (on a new connection).
        _attach(status, error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=0)))
        if error.resume_position is not None:
            info = error_details_pb2.ErrorInfo(
                reason="DRAINING",
                domain=ERROR_DOMAIN,
                metadata={"resume_position": str(error.resume_position)},
            )
            _attach(status, info)
    status.message = message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"
    return rpc_status.to_status(status)


def _attach(status: status_pb2.Status, detail: Message) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)
    status.details.append(packed)


async def abort(context: grpc.aio.ServicerContext[object, object], error: BaseException) -> NoReturn:
    """End the RPC for `error`: its status if expected, else INTERNAL (and a log line)."""
    if isinstance(error, GatewayError):
        await context.abort_with_status(to_status(error))
    log.error("unexpected error in RPC", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
