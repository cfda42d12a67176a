"""The gRPC edge: authenticate, decode, convert, call `sending`, convert back.

The service is registered with raw-bytes requests (`add_to_server`) and decodes them here,
after authentication: a message that does not decode (bad bytes, invalid UTF-8, nesting past
protobuf's limit) is the caller's error, INVALID_ARGUMENT with a short fixed text, where
grpcio's own decoding would answer UNKNOWN with Python's exception text and log a traceback.

Every expected failure is raised as a GatewayError and turned into a status by
`status.abort`, through `_abort`, which counts the violations of refused requests. What the
access line should say (tenant, summary) is noted on the current `calls.Call`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Final, Generic, NoReturn, TypeVar

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.protobuf.message import DecodeError, Message

from . import calls, convert, logs, status
from .admission import StreamHold, StreamSlots
from .errors import HeaderTimeout, InvalidRequest, ShuttingDown, StreamIdle, Unauthenticated
from .metrics import Metrics
from .model import BatchResult, Rule, Violation
from .sending import Sender, StreamSend
from .tenants import Tenant, TenantDirectory

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

    async def next(self) -> T | None:
        """The next message, None at the caller's end of stream; ShuttingDown once `stop` is set."""
        if self._pending is None:
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

    async def drain(self, seconds: float) -> None:
        """Read and drop what the caller is still writing to a stream we are about to fail.

        grpcio's asyncio client reports INTERNAL instead of the server's status when one of
        its writes fails because the server already ended the RPC (grpc/grpc#36066). Reading
        the rest for a bounded time lets such clients see the real status.
        """
        try:
            async with asyncio.timeout(seconds):
                if self._pending is not None:
                    await self._pending
                async for _ in self._messages:
                    pass
        except (TimeoutError, grpc.RpcError):
            pass
        finally:
            if self._pending is not None:
                self._pending.cancel()


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
        header_timeout_seconds: float = 10.0,
        deadline_margin_seconds: float = 0.1,
        reconcile_tail: int = 2048,
        idle_timeout_seconds: float = 60.0,
        streams: StreamSlots | None = None,
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
        self.streams = streams or StreamSlots(1000, 100)
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
        calls.note(tenant=tenant.id)
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
        await calls.header_sent()
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
            calls.note(summary=summary)
            return pb.SendResponse(
                results=[convert.result_to_proto(result) for result in done],
                summary=convert.summary_to_proto(summary, calls.current_request_id()),
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
            await reader.drain(self._drain_seconds)
            await self._abort(context, exc)
        calls.note(summary=session.summary)
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
        """Feed the session from the caller while its results go back, then the summary."""

        failure: list[BaseException] = []

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
                await session.close(send_rest=False)
                await reader.drain(self._drain_seconds)
            else:
                if session.holds_partial_batch:
                    # grpcio ends the requests the same way when the caller half-closes and when
                    # its connection is lost; the cancellation of a lost one follows at once. The
                    # last batch must not go out cut short for a caller who is gone (nor, under an
                    # idempotency key, be kept as another body than a repeat's).
                    await asyncio.sleep(CUT_OFF_SECONDS)
                await session.close(send_rest=not context.done())

        pumping = asyncio.create_task(pump())
        handed: deque[BatchResult] = deque(maxlen=self._reconcile_tail)
        try:
            try:
                async for result in session.results():
                    handed.append(result)  # before the write: a write cut short may have gone out
                    yield pb.SendStreamResponse(result=convert.result_to_proto(result))
                await pumping
            except Exception as exc:
                await self._abort(context, exc)
            finally:
                pumping.cancel()
                session.cancel()
            if failure:
                await self._abort(context, failure[0])
            yield pb.SendStreamResponse(
                summary=convert.summary_to_proto(session.summary, calls.current_request_id())
            )
        except (asyncio.CancelledError, GeneratorExit):
            # The RPC was cut off (the caller went away, or shutdown outlasted its grace): what gRPC
            # still buffered is lost, and a caller that had stopped reading never saw the last
            # results handed over. Log them, so that they can be reconciled.
            session.log_unread(handed)
            raise


CUT_OFF_SECONDS = 0.05
"""How long a stream's end waits, when it holds a partial last batch, for a lost connection's
cancellation to show before sending that batch."""


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
