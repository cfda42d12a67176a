"""The gRPC edge: authenticate, decode, convert, call `sending`, convert back.

The service is registered with raw-bytes requests (`add_to_server`) and decodes them here,
after authentication: a message that does not decode (bad bytes, invalid UTF-8, nesting past
protobuf's limit) is the caller's error, INVALID_ARGUMENT with a short fixed text, where
grpcio's own decoding would answer UNKNOWN with Python's exception text and log a traceback.

Every expected failure is raised as a GatewayError and turned into a status by
`status.abort`, through `_abort`, which counts the violations of refused requests. What the
access line should say (tenant, summary) is noted on the current `observer.Call`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Final, Generic, Literal, NoReturn, TypeVar

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.protobuf.message import DecodeError, Message

from .. import logs
from ..errors import HeaderTimeout, InvalidRequest, ShuttingDown, StreamIdle, Unauthenticated
from ..metrics import Metrics
from ..model import BatchResult, Rule, Violation
from ..sending import Sender, StreamSend
from ..tenants import Tenant, TenantDirectory
from . import convert, observer, status
from .admission import StreamHold, StreamSlots

Context = grpc.aio.ServicerContext[object, object]
T = TypeVar("T")
M = TypeVar("M", bound=Message)
log = logging.getLogger(__name__)
_undecodable_log = logs.Throttled(log)
SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["CanvasGatewayService"].full_name


def decode(message_type: type[M], raw: bytes, field: str, context: Context) -> M:
    """`raw` as a `message_type`; a message that does not decode is the caller's error."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        name = message_type.DESCRIPTOR.name
        _undecodable_log.warning(
            "refused a message that does not decode", peer=context.peer(), message_type=name
        )
        raise InvalidRequest(
            [Violation(field, f"not a valid {name} message: it does not decode", Rule.UNDECODABLE)]
        ) from None


def bearer_token(context: Context) -> str:
    """The token of `authorization: Bearer <token>`; empty if there is none."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return ""


class StreamReader(Generic[T]):
    """Reads a request stream one message at a time, and stops early when the gateway shuts down.

    A read cut short by shutdown stays pending, so `drain` can finish it: grpcio's request
    iterator must never be read twice at once.
    """

    def __init__(self, messages: AsyncIterator[T], stop: asyncio.Event) -> None:
        self._messages = messages
        self._stop = stop
        self._pending: asyncio.Future[T | None] | None = None
        self._draining: asyncio.Future[None] | None = None

    async def next(self) -> T | None:
        """The next message, None at the caller's end of stream; ShuttingDown once `stop` is set."""
        if self._pending is None:
            if self._stop.is_set() or self._draining is not None:
                raise ShuttingDown("the gateway is shutting down")
            self._pending = asyncio.ensure_future(anext(self._messages, None))
        if not self._pending.done():
            stopping = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait((self._pending, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if not self._pending.done():
                raise ShuttingDown("the gateway is shutting down")
        reading, self._pending = self._pending, None
        return reading.result()

    def drain(self) -> asyncio.Future[None]:
        """Read and drop, in a task of its own, what the caller still writes to a stream that
        reads no further, until the caller stops or `close`; started once, later calls return
        the same task.

        grpcio's asyncio client reports INTERNAL instead of the server's status when one of
        its writes fails because the server already ended the RPC (grpc/grpc#36066), and the
        writes of a caller whose stream nobody reads wait on flow control until then. Reading
        the rest lets such clients see the real status.
        """
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        return self._draining

    async def _drain(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            if self._pending is not None:
                await self._pending
            async for _ in self._messages:
                pass

    def close(self) -> None:
        """Read no more: the RPC is ending."""
        for reading in (self._pending, self._draining):
            if reading is not None:
                reading.cancel()


class InFlight:
    """Counts the gateway's own RPCs in progress, so shutdown knows when they are done."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self._count += 1
        self._idle.clear()

    def __exit__(self, *_: object) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    @property
    def busy(self) -> bool:
        return self._count > 0

    async def idle(self) -> None:
        await self._idle.wait()


class CanvasGatewayServicer:
    """canvas_gateway.v1.CanvasGatewayService over `Sender`, taking requests as raw bytes."""

    def __init__(
        self,
        tenants: TenantDirectory,
        sender: Sender,
        shutting_down: asyncio.Event,
        metrics: Metrics | None = None,
        drain_seconds: float = 2.0,
        *,
        header_timeout_seconds: float,
        deadline_margin_seconds: float,
        reconcile_tail: int,
        idle_timeout_seconds: float,
        streams: StreamSlots,
    ) -> None:
        self._tenants = tenants
        self._sender = sender
        self._shutting_down = shutting_down
        self._metrics = metrics or Metrics()
        self._drain_seconds = drain_seconds
        self._header_timeout_seconds = header_timeout_seconds
        self._deadline_margin_seconds = deadline_margin_seconds
        self._reconcile_tail = reconcile_tail
        self._idle_timeout_seconds = idle_timeout_seconds
        self.streams = streams
        self.in_flight = InFlight()

    def _authenticate(self, context: Context) -> Tenant:
        if self._shutting_down.is_set():
            raise ShuttingDown(
                "the gateway is shutting down: send again, to another instance", resume_position=0
            )
        token = bearer_token(context)
        tenant = self._tenants.authenticate(token) if token else None
        if tenant is None:
            reason = "unknown_token" if token else "missing_token"
            self._metrics.auth_failure(reason)
            log.warning("refused a call: %s", reason, extra={"peer": context.peer(), "reason": reason})
            if token:
                raise Unauthenticated("unknown bearer token")
            raise Unauthenticated("missing bearer token in `authorization` metadata")
        observer.note(tenant=tenant.id)
        return tenant

    def _deadline(self, context: Context) -> float | None:
        """The caller's deadline on time.monotonic, less the margin its results need to get back."""
        remaining: float | None = context.time_remaining()  # None without a deadline (the stubs say float)
        if remaining is None:
            return None
        return time.monotonic() + remaining - self._deadline_margin_seconds

    async def _abort(self, context: Context, error: BaseException) -> NoReturn:
        if isinstance(error, InvalidRequest):
            self._metrics.invalid(error.violations)
        await observer.header_sent()
        await status.abort(context, error)

    async def Send(self, raw: bytes, context: Context) -> pb.SendResponse:
        with self.in_flight:
            return await self._send(raw, context)

    async def _send(self, raw: bytes, context: Context) -> pb.SendResponse:
        try:
            tenant = self._authenticate(context)
            request = decode(pb.SendRequest, raw, "request", context)
            self._sender.check_unary_count(len(request.trigger.recipients))
            head = convert.trigger_head(request.trigger)
            recipients = [convert.recipient_to_dict(r) for r in request.trigger.recipients]
            options = request.options
            done, summary = await self._sender.send(
                tenant,
                head,
                recipients,
                options.validate_only,
                self._deadline(context),
                options.idempotency_key or None,
            )
            observer.note(summary=summary)
            return pb.SendResponse(
                results=[convert.result_to_proto(result) for result in done],
                summary=convert.summary_to_proto(summary, observer.current_request_id()),
            )
        except Exception as exc:  # every failure of the whole RPC is mapped in one place
            await self._abort(context, exc)

    async def SendStream(
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[pb.SendStreamResponse]:
        with self.in_flight, self.streams.hold() as hold:
            async for response in self._send_stream(
                StreamReader(request_iterator, self._shutting_down), context, hold
            ):
                yield response

    async def _send_stream(
        self, reader: StreamReader[bytes], context: Context, hold: StreamHold
    ) -> AsyncIterator[pb.SendStreamResponse]:
        try:
            tenant = self._authenticate(context)
            hold.take(tenant.id)
            try:
                async with asyncio.timeout(self._header_timeout_seconds):
                    raw = await reader.next()
            except TimeoutError:
                raise HeaderTimeout(
                    f"no stream header within {self._header_timeout_seconds:g} s; nothing was sent"
                ) from None
            first = None if raw is None else decode(pb.SendStreamRequest, raw, "messages[0]", context)
            if first is None or first.WhichOneof("part") != "header":
                raise _bad_stream("the first message of a stream must be a header")
            header = first.header
            session = self._sender.open_stream(
                tenant,
                convert.trigger_head(header.trigger),
                header.options.validate_only,
                self._deadline(context),
                header.options.idempotency_key or None,
            )
        except Exception as exc:
            await asyncio.wait((reader.drain(),), timeout=self._drain_seconds)
            reader.close()
            await self._abort(context, exc)
        observer.note(summary=session.summary)
        self._metrics.stream_opened(tenant.id)
        try:
            async for response in self._stream_results(session, reader, header, context):
                yield response
        finally:
            self._metrics.stream_closed(tenant.id)

    async def _next_message(self, reader: StreamReader[bytes], session: StreamSend) -> bytes | None:
        """The caller's next message; StreamIdle once it has sent nothing for the idle timeout
        while none of the stream's batches was in flight (a caller may wait for their results)."""
        began = time.monotonic()
        wait = self._idle_timeout_seconds
        while True:
            try:
                async with asyncio.timeout(wait):
                    return await reader.next()
            except TimeoutError:
                quiet = session.quiet_since
                wait = self._idle_timeout_seconds
                if quiet is not None:
                    wait -= time.monotonic() - max(began, quiet)
                    if wait <= 0:
                        raise StreamIdle(
                            f"the stream sent nothing for {self._idle_timeout_seconds:g} s: recipients from "
                            f"position {session.received} on were not read and NOT_ATTEMPTED batches were "
                            "not sent; send them again",
                            resume_position=session.received,
                        ) from None

    async def _stream_results(
        self,
        session: StreamSend,
        reader: StreamReader[bytes],
        header: pb.StreamHeader,
        context: Context,
    ) -> AsyncIterator[pb.SendStreamResponse]:
        """Feed the session from the caller while its results go back, then the summary.

        The last, partial batch is sent only once a write to the caller has succeeded after its
        requests ended (`StreamEnd`): a stream cut off sends none.
        """

        failure: list[BaseException] = []
        end = StreamEnd()
        # The stubs type the callback as a class of theirs; grpcio calls any callable with the context.
        context.add_done_callback(end.rpc_done)  # type: ignore[arg-type]

        async def pump() -> None:
            try:
                await session.feed(map(convert.recipient_to_dict, header.trigger.recipients))
                index = 0
                while (raw := await self._next_message(reader, session)) is not None:
                    index += 1
                    message = decode(pb.SendStreamRequest, raw, f"messages[{index}]", context)
                    if message.WhichOneof("part") != "chunk":
                        raise _bad_stream("only the first message may be a header")
                    await session.feed(map(convert.recipient_to_dict, message.chunk.recipients))
                session.check_complete()
            except Exception as exc:  # ends the stream after the results so far; bugs become INTERNAL
                if isinstance(exc, ShuttingDown):
                    exc = ShuttingDown(
                        f"the gateway is shutting down: recipients from position {session.received} on "
                        "were not read and NOT_ATTEMPTED batches were not sent; send them again",
                        resume_position=session.received,
                    )
                failure.append(exc)
                end.stopped.set()
                reader.drain()
                await session.close(send_rest=False)
            else:
                # Only a keyed stream waits for the proof: its short last batch would be kept under the
                # key and refuse the resume. Without a key the end is taken as the caller's, and
                # a cut-off stream sends its last batch like the others it had accepted.
                keyed = bool(header.options.idempotency_key)
                await session.close(send_rest=await end.half_closed(keyed and session.holds_partial_batch))

        async def drain_on_shutdown() -> None:
            # From the start of a drain: the pump may be waiting for its batches, not reading, and
            # a caller that does not read its results would stop it there until the stream is cut.
            await self._shutting_down.wait()
            reader.drain()

        pumping = asyncio.create_task(pump())
        watching = asyncio.create_task(drain_on_shutdown())
        handed: deque[BatchResult] = deque(maxlen=self._reconcile_tail)
        try:
            try:
                async for result in self._results_to_write(session, end, handed):
                    if result is None:
                        yield pb.SendStreamResponse()
                    else:
                        yield pb.SendStreamResponse(result=convert.result_to_proto(result))
                await pumping
                if failure:  # what the caller still writes is read: give it a while to stop
                    await asyncio.wait((reader.drain(),), timeout=self._drain_seconds)
            except Exception as exc:
                await self._abort(context, exc)
            finally:
                pumping.cancel()
                watching.cancel()
                reader.close()
                session.cancel()
            if failure:
                await self._abort(context, failure[0])
            yield pb.SendStreamResponse(
                summary=convert.summary_to_proto(session.summary, observer.current_request_id())
            )
        except (asyncio.CancelledError, GeneratorExit):
            # The RPC was cut off (the caller went away, or shutdown outlasted its grace): what gRPC
            # still buffered is lost, and a caller that had stopped reading never saw the last
            # results handed over. Log them, so that they can be reconciled.
            session.log_unread(handed)
            raise

    async def _results_to_write(
        self, session: StreamSend, end: StreamEnd, handed: deque[BatchResult]
    ) -> AsyncIterator[BatchResult | None]:
        """The session's results as they come, and None (an empty message) once the requests end
        with a partial batch open. gRPC resumes this generator only after writing what it
        yielded, so going on past the None proves the caller half-closed (`StreamEnd`)."""
        results = aiter(session.results())
        upcoming = asyncio.ensure_future(anext(results, None))
        stopped: asyncio.Task[Literal[True]] | None = asyncio.ensure_future(end.stopped.wait())
        try:
            while True:
                if stopped is not None:
                    await asyncio.wait((upcoming, stopped), return_when=asyncio.FIRST_COMPLETED)
                    if stopped.done():
                        stopped = None
                        if end.awaits_proof:
                            yield None
                            end.prove(alive=True)
                        continue
                if (result := await upcoming) is None:
                    return
                handed.append(result)  # before the write: a write cut short may have gone out
                yield result
                upcoming = asyncio.ensure_future(anext(results, None))
        finally:
            upcoming.cancel()
            if stopped is not None:
                stopped.cancel()


class StreamEnd:
    """Whether a stream's requests ended with the caller's half-close, told by a write.

    grpcio ends the request iterator alike when the caller half-closes (END_STREAM) and when the
    stream is reset or its connection lost, and gives the servicer nothing else to tell them
    apart: the receive's outcome does not (grpc/grpc#26245: only C++ can ask core's
    `grpc_call_failed_before_recv_message`) and grpcio drops it anyway; `context.done()` means
    our own status went out and `context.cancelled()` that we set CANCELLED; the cancellation
    itself (the RECV_CLOSE_ON_SERVER op, on which grpcio cancels the handler's task) completes in
    a batch of its own, in no set order with the end of the requests, and when the task is
    inside gRPC's write it never reaches our code. A timer that waits for it loses under load.

    What gRPC does give: on a reset or a lost connection chttp2 closes the stream for writing
    before it ends its reads, and fails every later write ("Attempt to send message after
    stream was closed"). So a write begun after the requests ended that succeeds proves the end
    was a half-close. When a keyed stream's requests end with a partial batch open, the stream
    writes an empty `SendStreamResponse` (no part: clients skip it) and sends that batch only
    once the write has succeeded: a cut-off stream's write fails, its RPC ends, and the batch is
    never sent (the resume sends it). Streams without a key never get the empty message (callers
    written before it stay unaffected): their end is taken as the caller's. A half-closed caller
    that does not read may hold its last batch until it reads, if its flow-control window is full.
    """

    def __init__(self) -> None:
        self.stopped = asyncio.Event()
        """The requests have ended, or reading them has stopped."""
        self.awaits_proof = False
        self._alive: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def half_closed(self, partial_batch: bool) -> bool:
        """At the end of the requests: may the last, partial batch be sent? With one open, waits
        until a write proves the caller there, or the RPC ends."""
        self.awaits_proof = partial_batch
        self.stopped.set()
        return await self._alive if partial_batch else True

    def prove(self, *, alive: bool) -> None:
        """What the write after the requests' end told; the first word stands."""
        if not self._alive.done():
            self._alive.set_result(alive)

    def rpc_done(self, _context: object) -> None:
        """The RPC ended before a write proved the caller there: the batch is not to be sent."""
        self.prove(alive=False)


def _bad_stream(why: str) -> InvalidRequest:
    return InvalidRequest([Violation("header", why, Rule.STREAM_HEADER)])


def add_to_server(servicer: CanvasGatewayServicer, server: grpc.aio.Server) -> None:
    """Register the service with raw-bytes requests, which the servicer decodes itself."""
    handlers: dict[str, grpc.RpcMethodHandler[bytes, Message]] = {
        "Send": grpc.unary_unary_rpc_method_handler(
            servicer.Send, response_serializer=pb.SendResponse.SerializeToString
        ),
        "SendStream": grpc.stream_stream_rpc_method_handler(
            servicer.SendStream, response_serializer=pb.SendStreamResponse.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
