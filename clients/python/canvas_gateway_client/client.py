"""The asyncio client for canvas_gateway.v1.CanvasGatewayService.

    async with CanvasGatewayClient("127.0.0.1:50051", token) as client:
        response = await client.send(braze_body)
        async for message in client.send_stream(header, recipients, chunk_size=500):
            ...

Requests take either generated messages or Braze JSON bodies (Mappings, parsed with
`json_format`; an unknown field raises `json_format.ParseError`). RPC failures are
`grpc.aio.AioRpcError`; `bad_request_violations` reads the field violations the gateway
attaches to INVALID_ARGUMENT, and `resume_position` where a draining gateway stopped reading a
stream (`send_stream(..., resumes=N)` resumes on its own). The bearer token is sent as metadata
on every call and is kept out of every repr and exception text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeAlias

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from google.protobuf import any_pb2, json_format, message
from google.rpc import error_details_pb2, status_pb2

DEFAULT_CHUNK_SIZE = 500
"""Recipients per stream message: hundreds per message keep the gateway's CPU cost low."""

STATUS_DETAILS_KEY = "grpc-status-details-bin"
RESUME_BACKOFF = 0.2
"""Seconds before the n-th resumed stream, times n: a draining gateway refuses new streams
until it has stopped, and its successor (or another replica) takes them."""
ERROR_DOMAIN = "canvas-gateway.internal"
"""google.rpc.ErrorInfo.domain of the gateway's own error details."""

TriggerLike: TypeAlias = pb.CanvasTrigger | Mapping[str, Any]
RecipientLike: TypeAlias = pb.Recipient | Mapping[str, Any]
Recipients: TypeAlias = Iterable[RecipientLike] | AsyncIterable[RecipientLike]
ChannelOptions: TypeAlias = Sequence[tuple[str, Any]]


class FieldViolation(NamedTuple):
    """One invalid field of a rejected request, as in google.rpc.BadRequest."""

    field: str
    """Path in Braze's JSON names, e.g. `recipients[3].email`."""
    description: str


def _status_details(error: grpc.aio.AioRpcError) -> list[any_pb2.Any]:
    """The google.rpc.Status details of `error`, read from the `grpc-status-details-bin` trailer
    directly, so grpcio-status is not needed."""
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return list(status_pb2.Status.FromString(value).details)
            except message.DecodeError:
                return []
    return []


def bad_request_violations(error: grpc.aio.AioRpcError) -> list[FieldViolation]:
    """The google.rpc.BadRequest field violations carried by `error` (empty if none)."""
    found: list[FieldViolation] = []
    for detail in _status_details(error):
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return found


def resume_position(error: grpc.aio.AioRpcError) -> int | None:
    """Where a draining gateway stopped reading a stream: the first position it did not read
    (every earlier one has a result), from its google.rpc.ErrorInfo (reason DRAINING). None when
    `error` is not a drain."""
    for detail in _status_details(error):
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and (info.domain, info.reason) == (ERROR_DOMAIN, "DRAINING"):
            position = info.metadata.get("resume_position", "")
            return int(position) if position.isdigit() else None
    return None


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
        resumes: int = 0,
    ) -> AsyncIterator[pb.SendStreamResponse]:
        """Stream `recipients` (after any in `header`) and yield the gateway's responses.

        Yields a `result` per batch as it completes (not in batch order; `positions` are
        offsets in the caller's order across header and `recipients`), then a `summary`.
        `recipients` is read lazily, one chunk ahead of the network, so memory stays flat.

        With `resumes` > 0, a stream that a draining gateway ends (UNAVAILABLE with a DRAINING
        ErrorInfo) is continued, up to that many times, on a new stream (the channel reconnects,
        to another replica behind a balancer or to the restarted gateway): the recipients
        without a result, and those of retryable NOT_ATTEMPTED results, are sent again, then the
        rest. Every position still gets exactly one result, in the caller's numbering; batch
        indexes stay unique; the last `summary` counts the whole send. Retryable NOT_ATTEMPTED
        results are held back until the send ends, since a resume may replace them. Only the
        recipients in flight are kept for this, so memory stays flat.

        If reading or parsing `recipients` raises, every recipient before the failing one
        is sent and nothing after it is read; the stream is closed normally, so each of
        them gets its result, and the error is raised after the summary (or, when the
        gateway then fails the stream, for example because no recipient came, in place
        of its AioRpcError). A failed RPC raises grpc.aio.AioRpcError.
        """
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if resumes < 0:
            raise ValueError("resumes must not be negative")
        stream = _Resumable(self, to_trigger(header), recipients, chunk_size, validate_only, timeout)
        async for response in stream.run(resumes):
            yield response


class _Resumable:
    """One caller's send over one or more streams, mapping each stream's positions back to the
    caller's. A resumed stream sends first the recipients that need sending again (`retry`,
    caller positions in order), then the rest from the source, from caller position `base`."""

    def __init__(
        self,
        client: CanvasGatewayClient,
        trigger: pb.CanvasTrigger,
        recipients: Recipients,
        chunk_size: int,
        validate_only: bool,
        timeout: float | None,
    ) -> None:
        self._client = client
        head = pb.CanvasTrigger()
        head.CopyFrom(trigger)
        del head.recipients[:]  # the header's own recipients come first in the source
        self._header = pb.SendStreamRequest(
            header=pb.StreamHeader(trigger=head, options=pb.SendOptions(validate_only=validate_only))
        )
        self._source = chunked(_then(trigger.recipients, recipients), chunk_size)
        self._chunks: asyncio.Queue[pb.RecipientChunk | None] = asyncio.Queue(1)
        self._chunk_size = chunk_size
        self._timeout = timeout
        self._failure: list[Exception] = []
        self._tracking = False
        self._next = 0  # the caller position of the next recipient taken from the source
        self._unanswered: dict[int, pb.Recipient] = {}  # sent, without a final result yet
        self._retry: list[int] = []
        self._base = 0
        self._index_base = 0
        self._next_index = 0
        self._summary = pb.SendSummary()

    def _requests(self) -> AsyncIterator[pb.SendStreamRequest]:
        retry = [self._unanswered[position] for position in self._retry]
        return self._stream_messages(retry)

    async def _stream_messages(self, retry: list[pb.Recipient]) -> AsyncIterator[pb.SendStreamRequest]:
        yield self._header
        for start in range(0, len(retry), self._chunk_size):
            yield pb.SendStreamRequest(
                chunk=pb.RecipientChunk(recipients=retry[start : start + self._chunk_size])
            )
        while (chunk := await self._chunks.get()) is not None:
            if self._tracking:  # kept until answered, in case it must be sent again
                for recipient in chunk.recipients:
                    self._unanswered[self._next] = recipient
                    self._next += 1
            else:
                self._next += len(chunk.recipients)
            yield pb.SendStreamRequest(chunk=chunk)
        self._chunks.put_nowait(None)  # the end stays visible to a resumed stream

    async def _read_source(self) -> None:
        """Read the source one chunk ahead, in a task of its own: a stream that ends (and so
        cancels its request iterator) never cancels the caller's source mid-read, and a resumed
        stream goes on from where the last one stopped."""
        try:
            async for chunk in self._source:
                await self._chunks.put(chunk)
        except Exception as exc:  # raised to the caller once the stream has drained
            self._failure.append(exc)
        await self._chunks.put(None)

    def _caller_position(self, position: int) -> int:
        retried = len(self._retry)
        return self._retry[position] if position < retried else self._base + position - retried

    def _remap(self, result: pb.BatchResult) -> pb.BatchResult:
        if self._retry or self._base or self._index_base:
            mapped = pb.BatchResult()
            mapped.CopyFrom(result)
            mapped.batch_index = result.batch_index + self._index_base
            mapped.positions[:] = [self._caller_position(p) for p in result.positions]
            result = mapped
        self._next_index = max(self._next_index, result.batch_index + 1)
        return result

    def _count(self, result: pb.BatchResult) -> None:
        counts = self._summary
        count = len(result.positions)
        counts.recipients += count
        counts.batches += 1
        field = _SUMMARY_FIELDS.get(result.outcome)
        if field:
            setattr(counts, field, getattr(counts, field) + count)

    async def run(self, resumes: int) -> AsyncIterator[pb.SendStreamResponse]:
        self._tracking = resumes > 0
        reader = asyncio.create_task(self._read_source())
        try:
            async for response in self._streams(resumes):
                yield response
        finally:
            reader.cancel()

    async def _streams(self, resumes: int) -> AsyncIterator[pb.SendStreamResponse]:
        attempt = 0
        while True:
            held: list[pb.BatchResult] = []
            summary: pb.SendSummary | None = None
            call = self._client._service().SendStream(
                self._requests(),
                metadata=self._client._metadata,
                timeout=self._timeout,
                wait_for_ready=attempt > 0 or None,  # a resumed stream waits for a gateway
            )
            try:
                async for response in call:
                    if not response.HasField("result"):
                        summary = response.summary
                        continue
                    result = self._remap(response.result)
                    if self._tracking and result.outcome == pb.OUTCOME_NOT_ATTEMPTED and result.retryable:
                        held.append(result)  # a resume would send these again
                        continue
                    for position in result.positions:
                        self._unanswered.pop(position, None)
                    self._count(result)
                    yield pb.SendStreamResponse(result=result) if result is not response.result else response
            except grpc.aio.AioRpcError as error:
                if attempt < resumes and resume_position(error) is not None and not self._failure:
                    attempt += 1
                    self._retry = sorted(self._unanswered)
                    self._base, self._index_base = self._next, self._next_index
                    await asyncio.sleep(RESUME_BACKOFF * attempt)  # the old gateway may still answer
                    continue
                for result in held:
                    yield pb.SendStreamResponse(result=result)
                if self._failure:  # e.g. no recipient was readable: the input error is the cause
                    raise self._failure[0] from error
                raise
            finally:
                call.cancel()  # a no-op once the call is done; stops the RPC if the caller left early
            for result in held:
                for position in result.positions:
                    self._unanswered.pop(position, None)
                self._count(result)
                yield pb.SendStreamResponse(result=result)
            if summary is not None:
                if attempt:  # the counts of every stream, with the last one's request id
                    self._summary.request_id = summary.request_id
                    summary = self._summary
                yield pb.SendStreamResponse(summary=summary)
            if self._failure:
                raise self._failure[0]
            return


_SUMMARY_FIELDS = {
    pb.OUTCOME_SENT: "recipients_sent",
    pb.OUTCOME_REJECTED: "recipients_rejected",
    pb.OUTCOME_UNKNOWN: "recipients_unknown",
    pb.OUTCOME_NOT_ATTEMPTED: "recipients_not_attempted",
    pb.OUTCOME_CANVAS_INACTIVE: "recipients_canvas_inactive",
}


async def _then(first: Iterable[RecipientLike], rest: Recipients) -> AsyncIterator[RecipientLike]:
    for recipient in first:
        yield recipient
    async for recipient in _aiter_any(rest):
        yield recipient
