"""The asyncio client for canvas_gateway.v1.CanvasGatewayService.

    async with CanvasGatewayClient("127.0.0.1:50051", token) as client:
        response = await client.send(braze_body)
        async for message in client.send_stream(header, recipients, chunk_size=500, resumes=5):
            ...
        # Safe to send again, and resumed from the start on a lost connection too:
        async for message in client.send_stream(
            header, recipient_list, idempotency_key="order-2026-11-29", resumes=5
        ):
            ...

Requests take either generated messages or Braze JSON bodies (Mappings, parsed with
`json_format`; an unknown field raises `json_format.ParseError`). RPC failures are
`grpc.aio.AioRpcError`; `bad_request_violations` reads the field violations the gateway
attaches to INVALID_ARGUMENT, and `error_info` / `resume_position` the google.rpc.ErrorInfo of a
stream ended by a draining gateway. The bearer token is sent as metadata on every call and is
kept out of every repr and exception text.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple, Self, TypeAlias

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from google.protobuf import any_pb2, json_format, message
from google.rpc import error_details_pb2, status_pb2

DEFAULT_CHUNK_SIZE = 500
"""Recipients per stream message: hundreds per message keep the gateway's CPU cost low."""

STATUS_DETAILS_KEY = "grpc-status-details-bin"
REQUEST_ID_KEY = "x-request-id"
ERROR_DOMAIN: Final = "canvas-gateway.internal"
"""google.rpc.ErrorInfo.domain of the gateway's own error details."""
DRAINING: Final = "DRAINING"
"""ErrorInfo.reason of a stream ended because the gateway drains (metadata `resume_position`)."""

MAX_HELD_RESULTS = 64
"""Retryable NOT_ATTEMPTED results held back for a resume at most (<= 3,200 recipients kept):
past it the oldest is yielded as it is, so memory stays flat even when Braze is down."""
RESUME_BACKOFF_SECONDS = 0.25
"""The first pause before a resume; it doubles with each resume, up to 5 seconds."""
KEYED_RESUME_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN})
"""How a stream with an idempotency key may end and be sent again from the start: a drain, a
lost connection (UNAVAILABLE), or a proxy's stream reset when its replica dies (UNKNOWN,
"Stream removed": the gateway itself never ends an RPC UNKNOWN). The key makes it safe."""
CORE_INTERNAL_DETAILS: Final = "Internal error from Core"
"""The details of the INTERNAL that grpcio's asyncio client reports itself when writing a request
fails, as on a connection lost mid-stream (the gateway's own INTERNAL says "internal error"): with
an idempotency key, resumed like KEYED_RESUME_CODES."""

log = logging.getLogger(__name__)

TriggerLike: TypeAlias = pb.CanvasTrigger | Mapping[str, Any]
RecipientLike: TypeAlias = pb.Recipient | Mapping[str, Any]
Recipients: TypeAlias = Iterable[RecipientLike] | AsyncIterable[RecipientLike]
RecipientSource: TypeAlias = Recipients | Callable[[], Recipients]
"""Recipients, or a function of no arguments that returns them afresh on each call (a stream
with an idempotency key is resumed by reading them again from the first)."""
ChannelOptions: TypeAlias = Sequence[tuple[str, Any]]


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


class Waiting(NamedTuple):
    """A send that waits before it goes on in a new stream, handed to `on_wait` (twice when the
    gateway does not come back: then with `gave_up` true, before the error is raised)."""

    cause: Literal["draining", "lost", "busy"]
    """Why: `draining` (the gateway shuts down), `lost` (UNAVAILABLE, UNKNOWN, or grpcio's own
    INTERNAL: the connection was lost or refused) or `busy` (batches another call is sending
    under the key)."""
    detail: str
    """The status that ended the stream (`UNAVAILABLE: ...`), or for `busy` how many batches."""
    resume: int
    """The resume it waits for, from 1, of `limit`."""
    limit: int
    pause: float
    """Seconds it pauses first."""
    wait: float
    """Then at most this many seconds for the gateway to accept connections."""
    gave_up: bool = False
    """The gateway did not accept connections within `wait`: the send ends with its error."""


OnWait: TypeAlias = Callable[[Waiting], None]


class FieldViolation(NamedTuple):
    """One invalid field of a rejected request, as in google.rpc.BadRequest."""

    field: str
    """Path in Braze's JSON names, e.g. `recipients[3].email`."""
    description: str


class Tracked(NamedTuple):
    """A stream response with the recipients of its result, in the order of `result.positions`
    (empty for the summary). Yielded by `CanvasGatewayClient.send_stream_tracked`."""

    response: pb.SendStreamResponse
    recipients: tuple[pb.Recipient, ...]


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


async def chunked(recipients: Recipients, size: int) -> AsyncIterator[list[pb.Recipient]]:
    """Lazily group `recipients` into lists of `size`.

    A list is yielded as soon as it is full, before the next recipient is pulled, so
    at most one is held in memory and a slow source never delays a full one.
    If the source (or parsing an item) raises, the recipients before the failing one
    are yielded first, then the error propagates.
    """
    chunk: list[pb.Recipient] = []
    try:
        async for item in _aiter_any(recipients):
            chunk.append(to_recipient(item))
            if len(chunk) >= size:
                yield chunk
                chunk = []
    except Exception:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


class _Source:
    """The caller's recipients in chunks, read by one stream after another.

    A read cut short because its stream ended stays pending for the next stream, so no
    recipient is lost or read twice. A failure to read or parse ends the input; it is kept in
    `failure`, to be raised once the stream has drained.
    """

    def __init__(self, recipients: Recipients, size: int) -> None:
        self._chunks = chunked(recipients, size)
        self._pending: asyncio.Future[list[pb.Recipient]] | None = None
        self.position = 0  # the caller's position of the next recipient
        self.ended = False
        self.failure: Exception | None = None

    async def next(self, stop: asyncio.Event) -> list[tuple[int, pb.Recipient]] | None:
        """The next chunk with the caller's positions; None at the end, or once `stop` is set."""
        if self.ended:
            return None
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self._chunks))
        if not self._pending.done():
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((self._pending, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
        if stop.is_set() or not self._pending.done():
            return None  # the read stays pending for the next stream
        reading, self._pending = self._pending, None
        try:
            chunk = reading.result()
        except StopAsyncIteration:
            self.ended = True
            return None
        except Exception as exc:  # raised to the caller once the stream has drained
            self.ended, self.failure = True, exc
            return None
        start, self.position = self.position, self.position + len(chunk)
        return list(enumerate(chunk, start))

    def close(self) -> None:
        """Stop a read still under way (the send is over)."""
        if self._pending is None:
            return
        if self._pending.done() and not self._pending.cancelled():
            self._pending.exception()  # retrieved: a failure no stream read is not worth a warning
        self._pending.cancel()


_OUTCOME_COUNTS = {
    pb.OUTCOME_SENT: "recipients_sent",
    pb.OUTCOME_REJECTED: "recipients_rejected",
    pb.OUTCOME_UNKNOWN: "recipients_unknown",
    pb.OUTCOME_NOT_ATTEMPTED: "recipients_not_attempted",
    pb.OUTCOME_CANVAS_INACTIVE: "recipients_canvas_inactive",
}


class _Stream:
    """One stream's recipients without a result yet: its position -> (the caller's position,
    the recipient). It holds what is in flight, no more, so memory stays flat."""

    def __init__(self, batch_offset: int) -> None:
        self.pending: dict[int, tuple[int, pb.Recipient]] = {}
        self.sent = 0
        self.batch_offset = batch_offset
        self.stop = asyncio.Event()

    def track(self, entries: Sequence[tuple[int, pb.Recipient]]) -> pb.SendStreamRequest:
        """A chunk of `entries` (the caller's position, recipient), noted as sent."""
        for entry in entries:
            self.pending[self.sent] = entry
            self.sent += 1
        return pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=[r for _, r in entries]))


class _Resumable:
    """The state of one `send_stream` across the streams it takes.

    Results are rewritten to the caller's positions (and to batch indexes that go on across
    streams); retryable NOT_ATTEMPTED ones are held back while a resume is possible, to be sent
    again rather than reported.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.resumes = 0
        self.stream = _Stream(0)
        self.next_batch = 0
        self.held: collections.deque[Tracked] = collections.deque()
        self.counts: collections.Counter[str] = collections.Counter()
        self.request_ids: list[str] = []

    def new_stream(self) -> _Stream:
        self.stream = _Stream(self.next_batch)
        return self.stream

    def take(self, result: pb.BatchResult) -> Iterator[Tracked]:
        """The result in the caller's terms, unless it is held back (then maybe an older one)."""
        entries = [self.stream.pending.pop(p) for p in result.positions]
        for old, (new, _) in zip(result.positions, entries, strict=True):
            if old != new:  # a rejected recipient's violations name it by its position
                _rename(result, f"recipients[{old}]", f"recipients[{new}]")
        del result.positions[:]
        result.positions.extend(position for position, _ in entries)
        result.batch_index += self.stream.batch_offset
        self.next_batch = max(self.next_batch, result.batch_index + 1)
        tracked = Tracked(pb.SendStreamResponse(result=result), tuple(r for _, r in entries))
        retry = result.outcome == pb.OUTCOME_NOT_ATTEMPTED and result.retryable
        if retry and self.resumes < self.limit:
            self.held.append(tracked)
            if len(self.held) > MAX_HELD_RESULTS:
                yield self.count(self.held.popleft())
        else:
            yield self.count(tracked)

    def count(self, tracked: Tracked) -> Tracked:
        result = tracked.response.result
        self.counts["recipients"] += len(result.positions)
        self.counts["batches"] += 1
        self.counts[_OUTCOME_COUNTS.get(result.outcome, "")] += len(result.positions)
        return tracked

    def release(self) -> Iterator[Tracked]:
        """The held results as they are: no resume will send their recipients again."""
        while self.held:
            yield self.count(self.held.popleft())

    def can_resume(self, resume_at: int | None) -> bool:
        """A drain at `resume_at` can be resumed: resumes are left, and every recipient the
        gateway read has its result (one read without a result is never sent again)."""
        return (
            resume_at is not None
            and self.resumes < self.limit
            and all(p >= resume_at for p in self.stream.pending)
        )

    def resume(self) -> list[tuple[int, pb.Recipient]]:
        """What the next stream sends first, in the caller's order: the recipients of the held
        results and those the gateway did not read."""
        self.resumes += 1
        entries = list(self.stream.pending.values())
        for held in self.held:
            entries.extend(zip(held.response.result.positions, held.recipients, strict=True))
        self.held.clear()
        return sorted(entries, key=lambda entry: entry[0])

    def summary(self, last: pb.SendSummary | None) -> Tracked:
        """The gateway's summary; after a resume, the counts of every stream's results and
        each stream's request id, comma-separated."""
        if not self.resumes and last is not None:
            return Tracked(pb.SendStreamResponse(summary=last), ())
        summary = pb.SendSummary(request_id=",".join(filter(None, self.request_ids)))
        for name in ("recipients", "batches", *_OUTCOME_COUNTS.values()):
            setattr(summary, name, self.counts[name])
        return Tracked(pb.SendStreamResponse(summary=summary), ())


_UNSEEN, _STANDS, _OPEN = 0, 1, 2
"""What `_Keyed` has yielded for a batch index: nothing, a result that stands, one that may not."""


def _stands(result: pb.BatchResult) -> bool:
    """Whether the gateway keeps the result under the key, so that every later stream replays it:
    SENT and UNKNOWN (it may have been sent). The others (NOT_ATTEMPTED, CANVAS_INACTIVE, REJECTED:
    nothing was sent) are sent again by a later stream with the key."""
    return result.outcome in (pb.OUTCOME_SENT, pb.OUTCOME_UNKNOWN)


def _retry_delay(result: pb.BatchResult) -> float | None:
    """The google.rpc.RetryInfo delay of a result, in seconds; None without one."""
    for detail in result.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


class _Keyed:
    """The state of one `send_stream` with an idempotency key across the streams it takes.

    Every stream sends every recipient from position 0, in the same order, under the same key, so
    positions and batch indexes are the gateway's own and the same in each stream: a batch that
    already has a result that stands comes back replayed and is dropped here. Retryable
    NOT_ATTEMPTED results are held back, by batch index, while a resume is possible (the next
    stream gives the batch its next result). A result that did not stand and was yielded anyway
    (held past MAX_HELD_RESULTS, CANVAS_INACTIVE, a REJECTED) is followed by the batch's
    later result if a later stream sends it (SENT, UNKNOWN...): the only batch yielded twice, and
    counted once, by its last result. Memory: a byte per batch, and the held results.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.resumes = 0
        self.yielded = bytearray()  # batch index -> _UNSEEN, _STANDS or _OPEN
        self.open: dict[int, tuple[pb.Outcome.ValueType, int]] = {}  # _OPEN index -> outcome, recipients
        self.held: dict[int, Tracked] = {}  # batch index -> result held back, oldest first
        self.counts: collections.Counter[str] = collections.Counter()
        self.request_ids: list[str] = []
        self.forgotten: int | None = None
        """A batch whose result stood and that came back sent again: the gateway lost the key."""

    def take(self, stream: _Stream, result: pb.BatchResult) -> Iterator[Tracked]:
        """The result, unless its batch has one already or it is held back (then maybe an older one)."""
        entries = [stream.pending.pop(p) for p in result.positions]
        index = result.batch_index
        if index >= len(self.yielded):
            self.yielded.extend(bytes(index + 1 - len(self.yielded)))
        seen = self.yielded[index]
        if seen == _STANDS:
            if not result.replayed and result.outcome in (pb.OUTCOME_SENT, pb.OUTCOME_UNKNOWN):
                self.forgotten = index if self.forgotten is None else self.forgotten
            return
        tracked = Tracked(pb.SendStreamResponse(result=result), tuple(r for _, r in entries))
        if seen == _OPEN:
            if _stands(result):  # sent after all (or by another call): it replaces the result yielded
                outcome, count = self.open.pop(index)
                self.counts[_OUTCOME_COUNTS.get(outcome, "")] -= count
                self.counts[_OUTCOME_COUNTS.get(result.outcome, "")] += count
                self.yielded[index] = _STANDS
                yield tracked
            return
        self.held.pop(index, None)
        if result.outcome == pb.OUTCOME_NOT_ATTEMPTED and result.retryable and self.resumes < self.limit:
            self.held[index] = tracked
            if len(self.held) > MAX_HELD_RESULTS:
                oldest = next(iter(self.held))
                yield self.count(self.held.pop(oldest))
        else:
            yield self.count(tracked)

    def count(self, tracked: Tracked) -> Tracked:
        result = tracked.response.result
        size = len(result.positions)
        self.counts["recipients"] += size
        self.counts["batches"] += 1
        self.counts[_OUTCOME_COUNTS.get(result.outcome, "")] += size
        if _stands(result):
            self.yielded[result.batch_index] = _STANDS
        else:
            self.yielded[result.batch_index] = _OPEN
            self.open[result.batch_index] = (result.outcome, size)
        return tracked

    def release(self) -> Iterator[Tracked]:
        """The held results as they are: no resume will send their batches again."""
        while self.held:
            yield self.count(self.held.pop(next(iter(self.held))))

    def busy_delay(self) -> float | None:
        """When a held batch that another call was sending (ABORTED) may be tried again: the
        longest of their RetryInfo delays; None when no held batch is one of those."""
        delays = [
            _retry_delay(held.response.result) or RESUME_BACKOFF_SECONDS
            for held in self.held.values()
            if held.response.result.code == grpc.StatusCode.ABORTED.value[0]
        ]
        return max(delays) if delays else None

    def summary(self, last: pb.SendSummary | None) -> Tracked:
        """The gateway's summary; after a resume, the count of every batch's result, once each,
        and each stream's request id, comma-separated."""
        if not self.resumes and last is not None:
            return Tracked(pb.SendStreamResponse(summary=last), ())
        summary = pb.SendSummary(request_id=",".join(filter(None, self.request_ids)))
        for name in ("recipients", "batches", *_OUTCOME_COUNTS.values()):
            setattr(summary, name, self.counts[name])
        return Tracked(pb.SendStreamResponse(summary=summary), ())


def _rereadable(recipients: RecipientSource) -> Callable[[], Recipients] | None:
    """How to read `recipients` again from the first: a Sequence, or a function that returns
    them afresh; None for anything else (an iterator or generator reads once)."""
    if isinstance(recipients, Iterable | AsyncIterable):
        if isinstance(recipients, Sequence) and not isinstance(recipients, str | bytes | bytearray):
            return lambda: recipients
        return None
    return recipients


def _once(recipients: RecipientSource) -> Recipients:
    if isinstance(recipients, Iterable | AsyncIterable):
        return recipients
    return recipients()


def _rename(result: pb.BatchResult, old: str, new: str) -> None:
    for violation in result.violations:
        if violation.field.startswith(old):
            violation.field = new + violation.field[len(old) :]
    if result.status_message.startswith(old):
        result.status_message = new + result.status_message[len(old) :]


async def _request_id(call: grpc.aio.StreamStreamCall[Any, Any]) -> str:
    for key, value in await call.initial_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            return value
    return ""


def _check_token(token: str) -> None:
    # The message never quotes the token: it is a secret even when malformed.
    if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError("token must be non-empty printable ASCII without whitespace")


DEFAULT_OPTIONS: ChannelOptions = (("grpc.http2.bdp_probe", 0),)
"""Channel arguments every client starts with. Without window auto-tuning (BDP) the receive
window stays at HTTP/2's 64 KB, about a thousand results: if this process stalls and the stream is
then cut off, that many results at most were handed over unread (about 18,000 with it, measured),
and the gateway logs them for reconciliation. Results are small: 300,000 recipients streamed on
loopback at about 68,000 a second either way (one run each, twice).
Pass ("grpc.http2.bdp_probe", 1) in `options` to turn auto-tuning back on."""


class CanvasGatewayClient:
    """An async client for one gateway; use it as an async context manager.

    `target` is a gRPC target such as "127.0.0.1:50051". Without `credentials` the channel
    is plaintext (loopback and tests); pass `grpc.ssl_channel_credentials()` otherwise.
    `options` are gRPC channel arguments, on top of `DEFAULT_OPTIONS`.
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
        self._options = (*DEFAULT_OPTIONS, *options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.CanvasGatewayServiceAsyncStub | None = None

    def __repr__(self) -> str:
        security = "insecure" if self._credentials is None else "secure"
        return f"{type(self).__name__}(target={self._target!r}, {security})"

    @property
    def target(self) -> str:
        """The gRPC target this client connects to."""
        return self._target

    def _service(self) -> tuple[grpc.aio.Channel, pb_grpc.CanvasGatewayServiceAsyncStub]:
        # The channel is opened on first use, inside the running event loop.
        if self._channel is None or self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self._target, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self._target, self._credentials, options=self._options
                )
            self._stub = pb_grpc.CanvasGatewayServiceStub(self._channel)
        return self._channel, self._stub

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
        idempotency_key: str | None = None,
    ) -> pb.SendResponse:
        """Send one request (unary Send): one result per batch of at most 50, in batch order.

        With `idempotency_key` (1 to 128 of [A-Za-z0-9._:-], scoped to your tenant) the gateway
        keeps each batch's final result: after a failure, send the same request again with the
        same key and nothing is sent twice; results it had kept come back with `replayed` true.

        Raises grpc.aio.AioRpcError; for INVALID_ARGUMENT nothing was sent and
        `bad_request_violations` names the fields.
        """
        request = pb.SendRequest(
            trigger=to_trigger(trigger),
            options=pb.SendOptions(validate_only=validate_only, idempotency_key=idempotency_key or ""),
        )
        _, stub = self._service()
        return await stub.Send(request, metadata=self._metadata, timeout=timeout)

    async def send_stream(
        self,
        header: TriggerLike,
        recipients: RecipientSource,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        validate_only: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, sent to the server
        resumes: int = 0,
        resume_wait: float = 60.0,
        idempotency_key: str | None = None,
        on_wait: OnWait | None = None,
    ) -> AsyncIterator[pb.SendStreamResponse]:
        """Stream `recipients` (after any in `header`) and yield the gateway's responses.

        Yields a `result` per batch as it completes (not in batch order; `positions` are
        offsets in the caller's order across header and `recipients`), then a `summary`.
        `recipients` is read lazily, one chunk ahead of the network, so memory stays flat.

        With `resumes` > 0, a stream the gateway ends by draining (UNAVAILABLE with the
        DRAINING ErrorInfo) goes on in a new stream, up to that many times: the recipients
        without a result are sent again, never one that has a result. Retryable NOT_ATTEMPTED
        results are held back meanwhile, and their recipients sent again on a resume (they are
        yielded when the stream ends otherwise). Every position gets exactly one result, in the
        caller's positions, and batch indexes go on across streams. A resume waits up to
        `resume_wait` seconds for the gateway to accept connections; `timeout` bounds the whole
        send; `on_wait`, when given, is told each wait before it starts (see `Waiting`). After a
        resume the summary is the client's count of the results it yielded, and
        its `request_id` lists each stream's request id, comma-separated.

        With `idempotency_key` the gateway keeps each batch's final result under the key, so
        the same stream sent again with the same key sends nothing twice (kept results come back
        with `replayed` true). A resume then sends the whole stream again from position 0 under
        the key, instead of only what has no result: after a drain, and after any UNAVAILABLE
        (a lost connection, a gateway that died), UNKNOWN (a proxy's reset stream) or grpcio's
        own INTERNAL "Internal error from Core" (a write on a lost connection). Each batch's
        result is yielded once: one that comes back again is dropped. A batch another call was
        sending (NOT_ATTEMPTED, ABORTED) is tried again by a resume after its RetryInfo delay.
        Positions and batch indexes are the gateway's, the same in every stream. For this the
        recipients must be readable again from the first, in the same order: pass a Sequence,
        or a function of no arguments that returns them afresh (an iterable or async iterable)
        each time it is called. An iterator or generator is read once: with a key it is never
        resumed (the error is raised, as with `resumes=0`); send it again yourself, with the key.
        A batch whose result did not stand (held past 64, CANVAS_INACTIVE, a REJECTED)
        and that a later stream sends gets its later result too: the one batch yielded twice.
        The gateway must still hold the key's results (Redis shared by every replica; without
        CGW_REDIS_URL, only the gateways of one host share them): a batch whose result stood that
        comes back sent again stops the send at once with KeyForgotten.

        If reading or parsing `recipients` raises, every recipient before the failing one
        is sent and nothing after it is read; the stream is closed normally, so each of
        them gets its result, and the error is raised after the summary (or, when the
        gateway then fails the stream, for example because no recipient came, in place
        of its AioRpcError). A failed RPC raises grpc.aio.AioRpcError.
        """
        async for tracked in self.send_stream_tracked(
            header,
            recipients,
            chunk_size=chunk_size,
            validate_only=validate_only,
            timeout=timeout,
            resumes=resumes,
            resume_wait=resume_wait,
            idempotency_key=idempotency_key,
            on_wait=on_wait,
        ):
            yield tracked.response

    async def send_stream_tracked(
        self,
        header: TriggerLike,
        recipients: RecipientSource,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        validate_only: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, sent to the server
        resumes: int = 0,
        resume_wait: float = 60.0,
        idempotency_key: str | None = None,
        on_wait: OnWait | None = None,
    ) -> AsyncIterator[Tracked]:
        """`send_stream`, each response with the recipients its result holds (see `Tracked`)."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if resumes < 0:
            raise ValueError("resumes must not be negative")
        trigger = to_trigger(header)
        head = pb.CanvasTrigger()
        head.CopyFrom(trigger)
        del head.recipients[:]  # the header's recipients go first, in chunks like the others
        options = pb.SendOptions(validate_only=validate_only, idempotency_key=idempotency_key or "")
        first = pb.StreamHeader(trigger=head, options=options)
        again = _rereadable(recipients)
        if idempotency_key and resumes and again is not None:
            async for tracked in self._send_keyed(
                first,
                tuple(trigger.recipients),
                again,
                chunk_size,
                timeout,
                _Keyed(resumes),
                resume_wait,
                on_wait,
            ):
                yield tracked
            return
        if idempotency_key:
            resumes = 0  # read once: a resume of what has no result would not match the kept batches
        source = _Source(_once(recipients), chunk_size)
        state = _Resumable(resumes)
        backlog: list[tuple[int, pb.Recipient]] = list(enumerate(trigger.recipients))
        source.position = len(backlog)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        channel, stub = self._service()
        try:
            while True:
                stream = state.new_stream()
                call = stub.SendStream(
                    self._requests(first, backlog, source, stream, chunk_size),
                    metadata=self._metadata,
                    timeout=None if deadline is None else max(0.0, deadline - loop.time()),
                    wait_for_ready=bool(state.resumes),
                )
                last: pb.SendSummary | None = None
                error: grpc.aio.AioRpcError | None = None
                try:
                    async for response in call:
                        if response.HasField("result"):
                            for tracked in state.take(response.result):
                                yield tracked
                        elif response.HasField("summary"):  # a message with no part is skipped
                            last = response.summary
                except grpc.aio.AioRpcError as exc:
                    error = exc
                finally:
                    stream.stop.set()  # this stream's requests read no further
                    call.cancel()  # a no-op once the call is done; stops the RPC if the caller left early
                state.request_ids.append(await _request_id(call))
                if error is None:
                    break
                wait = resume_wait if deadline is None else min(resume_wait, deadline - loop.time())
                if not state.can_resume(resume_position(error)) or not await _ready(
                    channel, _waiting(error, state.resumes, state.limit, wait), on_wait
                ):
                    for tracked in state.release():
                        yield tracked
                    if (
                        source.failure is not None
                    ):  # e.g. no recipient was readable: the input error is the cause
                        raise source.failure from error
                    raise error
                backlog = state.resume() or await source.next(asyncio.Event()) or []
                if not backlog:
                    break  # the drain came after the last recipient had its result: nothing left
            for tracked in state.release():
                yield tracked
            yield state.summary(last if error is None else None)
        finally:
            source.close()
        if source.failure is not None:
            raise source.failure

    async def _send_keyed(
        self,
        first: pb.StreamHeader,
        head_recipients: tuple[pb.Recipient, ...],
        recipients: Callable[[], Recipients],
        chunk_size: int,
        timeout: float | None,  # noqa: ASYNC109 - a gRPC deadline, sent to the server
        state: _Keyed,
        resume_wait: float,
        on_wait: OnWait | None,
    ) -> AsyncIterator[Tracked]:
        """`send_stream_tracked` with an idempotency key and resumes: each stream sends the
        whole sequence from position 0 (see `_Keyed`)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        channel, stub = self._service()
        while True:
            source = _Source(recipients(), chunk_size)
            source.position = len(head_recipients)
            stream = _Stream(0)
            last: pb.SendSummary | None = None
            error: grpc.aio.AioRpcError | None = None
            try:
                call = stub.SendStream(
                    self._requests(first, list(enumerate(head_recipients)), source, stream, chunk_size),
                    metadata=self._metadata,
                    timeout=None if deadline is None else max(0.0, deadline - loop.time()),
                    wait_for_ready=bool(state.resumes),
                )
                try:
                    async for response in call:
                        if response.HasField("result"):
                            for tracked in state.take(stream, response.result):
                                yield tracked
                            if state.forgotten is not None:
                                break  # every later batch would be sent again too: stop now
                        elif response.HasField("summary"):  # a message with no part is skipped
                            last = response.summary
                except grpc.aio.AioRpcError as exc:
                    error = exc
                finally:
                    stream.stop.set()  # this stream's requests read no further
                    call.cancel()  # a no-op once the call is done; stops the RPC if the caller left early
                state.request_ids.append(await _request_id(call))
            finally:
                source.close()
            if state.forgotten is not None:
                log.error("%s", KeyForgotten(state.forgotten))
                for tracked in state.release():
                    yield tracked
                raise KeyForgotten(state.forgotten)
            left = None if deadline is None else deadline - loop.time()
            if await _resume_keyed(channel, state, error, left, resume_wait, on_wait):
                state.resumes += 1
                continue
            for tracked in state.release():
                yield tracked
            if error is not None:
                if source.failure is not None:  # e.g. no recipient was readable: the input error is the cause
                    raise source.failure from error
                raise error
            yield state.summary(last)
            if source.failure is not None:
                raise source.failure
            return

    @staticmethod
    async def _requests(
        first: pb.StreamHeader,
        backlog: list[tuple[int, pb.Recipient]],
        source: _Source,
        stream: _Stream,
        chunk_size: int,
    ) -> AsyncIterator[pb.SendStreamRequest]:
        yield pb.SendStreamRequest(header=first)
        for start in range(0, len(backlog), chunk_size):
            yield stream.track(backlog[start : start + chunk_size])
        while (entries := await source.next(stream.stop)) is not None:
            yield stream.track(entries)


def _connection_lost(error: grpc.aio.AioRpcError) -> bool:
    """Whether a stream ended by `error` may go on, with its key, in a new one: the gateway drained,
    or the connection to it was lost (KEYED_RESUME_CODES, CORE_INTERNAL_DETAILS)."""
    if error.code() in KEYED_RESUME_CODES:
        return True
    return error.code() == grpc.StatusCode.INTERNAL and error.details() == CORE_INTERNAL_DETAILS


async def _resume_keyed(
    channel: grpc.aio.Channel,
    state: _Keyed,
    error: grpc.aio.AioRpcError | None,
    left: float | None,
    resume_wait: float,
    on_wait: OnWait | None = None,
) -> bool:
    """Whether a keyed stream that ended with `error` (None: normally) goes on in a new one, once
    the gateway is ready: when resumes and time (`left`, None: no deadline) remain, after a
    drain or a lost connection, or after a normal end holding batches another call was
    sending (after their RetryInfo delay)."""
    if state.resumes >= state.limit or (left is not None and left <= 0):
        return False
    wait = resume_wait if left is None else min(resume_wait, left)
    if error is not None:
        return _connection_lost(error) and await _ready(
            channel, _waiting(error, state.resumes, state.limit, wait), on_wait
        )
    delay = state.busy_delay()
    if delay is None or (left is not None and delay >= left):
        return False
    busy = sum(held.response.result.code == grpc.StatusCode.ABORTED.value[0] for held in state.held.values())
    waiting = Waiting("busy", f"{busy} batches", state.resumes + 1, state.limit, delay, wait)
    return await _ready(channel, waiting, on_wait)


def _waiting(error: grpc.aio.AioRpcError, resumes: int, limit: int, wait: float) -> Waiting:
    """The wait before resume `resumes + 1` after a stream ended by `error`: a pause that
    doubles with each resume, then up to `wait` seconds for the gateway."""
    cause: Literal["draining", "lost"] = "draining" if resume_position(error) is not None else "lost"
    detail = f"{error.code().name}: {error.details() or ''}"
    return Waiting(cause, detail, resumes + 1, limit, min(RESUME_BACKOFF_SECONDS * 2**resumes, 5.0), wait)


async def _ready(channel: grpc.aio.Channel, waiting: Waiting, on_wait: OnWait | None) -> bool:
    """Tell `on_wait`, pause, then wait up to `waiting.wait` seconds for the gateway; tell
    `on_wait` again when it does not come back."""
    if on_wait is not None:
        on_wait(waiting)
    ready = await _ready_after(channel, waiting.pause, waiting.wait)
    if not ready and on_wait is not None:
        on_wait(waiting._replace(gave_up=True))
    return ready


async def _ready_after(channel: grpc.aio.Channel, pause: float, wait: float) -> bool:
    """Pause `pause` seconds, then wait up to `wait` seconds for the gateway."""
    await asyncio.sleep(pause)
    try:
        async with asyncio.timeout(max(0.0, wait)):
            await channel.channel_ready()
    except TimeoutError:
        return False
    return True
