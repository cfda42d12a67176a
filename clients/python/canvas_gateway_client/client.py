"""The asyncio client for canvas_gateway.v1.CanvasGatewayService.

    async with CanvasGatewayClient("127.0.0.1:50051", token) as client:
        response = await client.send(braze_body)
        async for message in client.send_stream(header, recipients, chunk_size=500):
            ...

Requests take either generated messages or Braze JSON bodies (Mappings, parsed with
`json_format`; an unknown field raises `json_format.ParseError`). RPC failures are
`grpc.aio.AioRpcError`; `bad_request_violations` reads the field violations the gateway
attaches to INVALID_ARGUMENT. The bearer token is sent as metadata on every call and is
kept out of every repr and exception text.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeAlias

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from google.protobuf import json_format, message
from google.rpc import error_details_pb2, status_pb2

DEFAULT_CHUNK_SIZE = 500
"""Recipients per stream message: hundreds per message keep the gateway's CPU cost low."""

STATUS_DETAILS_KEY = "grpc-status-details-bin"

TriggerLike: TypeAlias = pb.CanvasTrigger | Mapping[str, Any]
RecipientLike: TypeAlias = pb.Recipient | Mapping[str, Any]
Recipients: TypeAlias = Iterable[RecipientLike] | AsyncIterable[RecipientLike]
ChannelOptions: TypeAlias = Sequence[tuple[str, Any]]


class FieldViolation(NamedTuple):
    """One invalid field of a rejected request, as in google.rpc.BadRequest."""

    field: str
    """Path in Braze's JSON names, e.g. `recipients[3].email`."""
    description: str


def bad_request_violations(error: grpc.aio.AioRpcError) -> list[FieldViolation]:
    """The google.rpc.BadRequest field violations carried by `error` (empty if none).

    Reads the `grpc-status-details-bin` trailer directly, so grpcio-status is not needed.
    """
    found: list[FieldViolation] = []
    for key, value in error.trailing_metadata() or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except message.DecodeError:
            continue
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                found.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return found


def _as_dict(body: Mapping[str, Any]) -> dict[str, Any]:
    return body if isinstance(body, dict) else dict(body)


def to_trigger(body: TriggerLike) -> pb.CanvasTrigger:
    """A CanvasTrigger from itself or from a Braze `/canvas/trigger/send` JSON body."""
    if isinstance(body, pb.CanvasTrigger):
        return body
    if isinstance(body, Mapping):
        return json_format.ParseDict(_as_dict(body), pb.CanvasTrigger())
    raise TypeError(f"expected a CanvasTrigger or a Mapping, not {type(body).__name__}")


def to_recipient(item: RecipientLike) -> pb.Recipient:
    """A Recipient from itself or from one Braze recipient JSON object."""
    if isinstance(item, pb.Recipient):
        return item
    if isinstance(item, Mapping):
        return json_format.ParseDict(_as_dict(item), pb.Recipient())
    raise TypeError(f"expected a Recipient or a Mapping, not {type(item).__name__}")


async def _aiter_any(items: Recipients) -> AsyncIterator[RecipientLike]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


async def chunked(recipients: Recipients, size: int) -> AsyncIterator[pb.RecipientChunk]:
    """Lazily group `recipients` into chunks of `size`.

    A chunk is yielded as soon as it is full, before the next recipient is pulled, so
    at most one chunk is held in memory and a slow source never delays a full chunk.
    If the source (or parsing an item) raises, the recipients before the failing one
    are yielded first, then the error propagates.
    """
    chunk = pb.RecipientChunk()
    try:
        async for item in _aiter_any(recipients):
            chunk.recipients.append(to_recipient(item))
            if len(chunk.recipients) >= size:
                yield chunk
                chunk = pb.RecipientChunk()
    except Exception:
        if chunk.recipients:
            yield chunk
        raise
    if chunk.recipients:
        yield chunk


def _check_token(token: str) -> None:
    # The message never quotes the token: it is a secret even when malformed.
    if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError("token must be non-empty printable ASCII without whitespace")


class CanvasGatewayClient:
    """An async client for one gateway; use it as an async context manager.

    `target` is a gRPC target such as "127.0.0.1:50051". Without `credentials` the channel
    is plaintext (loopback and tests); pass `grpc.ssl_channel_credentials()` otherwise.
    `options` are gRPC channel arguments.
    """

    def __init__(
        self,
        target: str,
        token: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions = (),
    ) -> None:
        _check_token(token)
        self._target = target
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._credentials = credentials
        self._options = tuple(options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.CanvasGatewayServiceAsyncStub | None = None

    def __repr__(self) -> str:
        security = "insecure" if self._credentials is None else "secure"
        return f"{type(self).__name__}(target={self._target!r}, {security})"

    @property
    def target(self) -> str:
        """The gRPC target this client connects to."""
        return self._target

    def _service(self) -> pb_grpc.CanvasGatewayServiceAsyncStub:
        # The channel is opened on first use, inside the running event loop.
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self._target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self._target, self._credentials, options=self._options
                )
            self._stub = pb_grpc.CanvasGatewayServiceStub(self._channel)
        return self._stub

    async def __aenter__(self) -> Self:
        self._service()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel, cancelling RPCs still running; the client may be reused after."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def send(
        self,
        trigger: TriggerLike,
        *,
        validate_only: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, sent to the server
    ) -> pb.SendResponse:
        """Send one request (unary Send): one result per batch of at most 50, in batch order.

        Raises grpc.aio.AioRpcError; for INVALID_ARGUMENT nothing was sent and
        `bad_request_violations` names the fields.
        """
        request = pb.SendRequest(
            trigger=to_trigger(trigger), options=pb.SendOptions(validate_only=validate_only)
        )
        return await self._service().Send(request, metadata=self._metadata, timeout=timeout)

    async def send_stream(
        self,
        header: TriggerLike,
        recipients: Recipients,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        validate_only: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, sent to the server
    ) -> AsyncIterator[pb.SendStreamResponse]:
        """Stream `recipients` (after any in `header`) and yield the gateway's responses.

        Yields a `result` per batch as it completes (not in batch order; `positions` are
        offsets in the caller's order across header and `recipients`), then a `summary`.
        `recipients` is read lazily, one chunk ahead of the network, so memory stays flat.

        If reading or parsing `recipients` raises, every recipient before the failing one
        is sent and nothing after it is read; the stream is closed normally, so each of
        them gets its result, and the error is raised after the summary (or, when the
        gateway then fails the stream, for example because no recipient came, in place
        of its AioRpcError). A failed RPC raises grpc.aio.AioRpcError.
        """
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        first = pb.SendStreamRequest(
            header=pb.StreamHeader(
                trigger=to_trigger(header), options=pb.SendOptions(validate_only=validate_only)
            )
        )
        failure: list[Exception] = []

        async def requests() -> AsyncIterator[pb.SendStreamRequest]:
            yield first
            try:
                async for chunk in chunked(recipients, chunk_size):
                    yield pb.SendStreamRequest(chunk=chunk)
            except Exception as exc:  # raised to the caller once the stream has drained
                failure.append(exc)

        call = self._service().SendStream(requests(), metadata=self._metadata, timeout=timeout)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as error:
            if failure:  # e.g. no recipient was readable: the input error is the cause
                raise failure[0] from error
            raise
        finally:
            call.cancel()  # a no-op once the call is done; stops the RPC if the caller left early
        if failure:
            raise failure[0]
