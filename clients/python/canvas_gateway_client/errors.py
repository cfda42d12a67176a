"""The gateway's error details, read from a failed RPC: the google.rpc.BadRequest field violations
of an INVALID_ARGUMENT and the google.rpc.ErrorInfo of a stream ended by a draining gateway, read
from the `grpc-status-details-bin` trailer directly (grpcio-status is not needed); and
`KeyForgotten`, the client's own error for a resume under a key the gateway no longer holds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, NamedTuple

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"
ERROR_DOMAIN: Final = "canvas-gateway.internal"
"""google.rpc.ErrorInfo.domain of the gateway's own error details."""
DRAINING: Final = "DRAINING"
"""ErrorInfo.reason of a stream ended because the gateway drains (metadata `resume_position`)."""


class KeyForgotten(Exception):
    """A stream resumed under an idempotency key found a batch sent again: the gateway no longer
    had the result it had given for it (without CGW_REDIS_URL a gateway keeps keys on its host:
    one on another host has none; or the key's results expired). The send was
    stopped there: the recipients of `batch_index`, and of batches in flight with it, may have
    been messaged twice."""

    def __init__(self, batch_index: int) -> None:
        super().__init__(
            f"batch {batch_index} was sent again under the idempotency key: the gateway no longer "
            "had its result (without CGW_REDIS_URL a gateway keeps keys on its host only, and "
            "results expire); the send was stopped: its recipients, and those of batches in "
            "flight with it, may have been messaged twice"
        )
        self.batch_index = batch_index


class SentAsOneStream(Exception):
    """A keyed send in parts found, before its second part, that its key was first sent as one
    stream past the first part (by another client): its later parts would have gone under keys
    of their own and been sent again, so none was sent. Sending again resends it as one stream."""

    def __init__(self, key_length: int) -> None:
        super().__init__(
            f"the idempotency key ({key_length} characters) was first sent as one stream of more than "
            "5,000 recipients, which this send could not see when it began (the gateway did not "
            "answer): it stopped after the first 5,000, so that no later recipient is sent twice; "
            "send it again with the same key: it is resent as one stream"
        )


class FieldViolation(NamedTuple):
    """One invalid field of a rejected request, as in google.rpc.BadRequest."""

    field: str
    """Path in Braze's JSON names, e.g. `recipients[3].email`."""
    description: str


def _details(error: grpc.aio.AioRpcError) -> Iterator[any_pb2.Any]:
    """The google.rpc.Status details of `error`, read from the `grpc-status-details-bin` trailer
    directly, so grpcio-status is not needed."""
    for key, value in error.trailing_metadata() or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            yield from status_pb2.Status.FromString(value).details
        except message.DecodeError:
            continue


def bad_request_violations(error: grpc.aio.AioRpcError) -> list[FieldViolation]:
    """The google.rpc.BadRequest field violations carried by `error` (empty if none)."""
    found: list[FieldViolation] = []
    for detail in _details(error):
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return found


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The first google.rpc.ErrorInfo carried by `error`, or None."""
    for detail in _details(error):
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def resume_position(error: grpc.aio.AioRpcError) -> int | None:
    """Where to resume a stream the gateway ended by draining: the first position it did not read
    (every earlier one has a result). None when `error` is not such an ending.

    The position counts in the stream that failed: after `send_stream` resumed, that is the last
    stream, not your order (the results carry your positions)."""
    info = error_info(error)
    if error.code() != grpc.StatusCode.UNAVAILABLE or info is None:
        return None
    if (info.domain, info.reason) != (ERROR_DOMAIN, DRAINING):
        return None
    text = info.metadata.get("resume_position", "")
    return int(text) if text.isdigit() else None
