"""The gRPC edge: authenticate, decode, convert, call `sending`, convert back.

The service is registered with raw-bytes requests (`add_to_server`) and decodes them here
(`convert.decode`), after authentication: a message that does not decode (bad bytes,
invalid UTF-8, nesting past protobuf's limit) is the caller's error, INVALID_ARGUMENT with a
short fixed text, where grpcio's own decoding would answer UNKNOWN with Python's exception
text and log a traceback.

Every expected failure is raised as a GatewayError and turned into a status by
`status.abort`, through `_abort`, which counts the violations of refused requests. What the
access line should say (tenant, summary) is noted on the current `access.Call`.

This is the send path (Send, SendStream); the after-the-fact RPCs (GetResults, FindRecipient,
ListUnknown, Replay) are in `queries`, registered by `add_to_server` under the same service name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final, NoReturn

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.protobuf.message import Message

from ..context import RequestContext
from ..errors import HeaderTimeout, InvalidRequest, ShuttingDown, Unauthenticated
from ..metrics import Metrics
from ..model import BatchResult, Rule, Violation
from ..sending import Sender, StreamSend, UnarySend
from ..tenants import Tenant, TenantDirectory
from . import convert, observer, status
from .admission import InFlight, StreamHold, StreamSlots
from .native import Native
from .queries import ResultQueries
from .streams import StreamEnd, StreamReader, next_message, results_to_write

Context = grpc.aio.ServicerContext[object, object]
log = logging.getLogger(__name__)
SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["CanvasGatewayService"].full_name


def bearer_token(context: Context) -> str:
    """The token of `authorization: Bearer <token>`; empty if there is none."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return ""


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
        native: Native | None = None,
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
        self._native = native
        """The compiled recipient path (`native`), or None: every recipient through `convert`."""

    @property
    def sender(self) -> Sender:
        return self._sender

    def authenticate(self, context: Context) -> Tenant:
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

    def request_context(self, tenant: Tenant, options: pb.SendOptions, context: Context) -> RequestContext:
        """What the layers below are told of the RPC: its tenant, the caller's deadline on
        time.monotonic less the margin its results need to get back, its idempotency key and
        request id, and whether it is only validated."""
        remaining: float | None = context.time_remaining()  # None without a deadline (the stubs say float)
        margin = self._deadline_margin_seconds
        return RequestContext.of(
            tenant,
            deadline=None if remaining is None else time.monotonic() + remaining - margin,
            key=options.idempotency_key or None,
            request_id=observer.current_request_id(),
            validate_only=options.validate_only,
            lane=convert.lane(options.priority),
        )

    async def abort(self, context: Context, error: BaseException) -> NoReturn:
        if isinstance(error, InvalidRequest):
            self._metrics.invalid(error.violations)
        await observer.header_sent()
        await status.abort(context, error)

    async def Send(self, raw: bytes, context: Context) -> pb.SendResponse:
        with self.in_flight:
            return await self._send(raw, context)

    async def _send(self, raw: bytes, context: Context) -> pb.SendResponse:
        try:
            tenant = self.authenticate(context)
            request = convert.decode(pb.SendRequest, raw, "request", context)
            self._sender.check_unary_count(len(request.trigger.recipients))
            request_context = self.request_context(tenant, request.options, context)
            unary = self._sender.open_send(request_context, convert.trigger_head(request.trigger))
            await self._take_recipients(unary, raw, request.trigger)
            done, summary = await self._sender.send(unary)
            observer.note(summary=summary)
            return pb.SendResponse(
                results=[convert.result_to_proto(result) for result in done],
                summary=convert.summary_to_proto(summary, request_context.request_id),
            )
        except Exception as exc:  # every failure of the whole RPC is mapped in one place
            await self.abort(context, exc)

    async def _take_recipients(self, unary: UnarySend, raw: bytes, trigger: pb.CanvasTrigger) -> None:
        """A Send's recipients into `unary`: by the compiled path when it reads every one of them,
        else through `convert` (the reference, and the source of every violation)."""
        if self._native is not None:
            encoded = self._native.send(raw, unary.context_name, unary.encoded_limit)
            if encoded is not None:
                unary.take_encoded(encoded)
                return
        await unary.take(map(convert.recipient_to_dict, trigger.recipients))

    async def SendStream(
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[pb.SendStreamResponse]:
        # Each nested generator is closed with the one above it (aclosing), at once: when gRPC
        # closes the handler, a cut-off stream's reconciliation log and cancellation run now, not
        # whenever the event loop finalizes a generator left suspended.
        with self.in_flight, self.streams.hold() as hold:
            reader = StreamReader(request_iterator, self._shutting_down)
            async with contextlib.aclosing(self._send_stream(reader, context, hold)) as responses:
                async for response in responses:
                    yield response

    async def _send_stream(
        self, reader: StreamReader[bytes], context: Context, hold: StreamHold
    ) -> AsyncGenerator[pb.SendStreamResponse, None]:
        try:
            tenant = self.authenticate(context)
            hold.take(tenant.id)
            try:
                async with asyncio.timeout(self._header_timeout_seconds):
                    raw = await reader.next()
            except TimeoutError:
                raise HeaderTimeout(
                    f"no stream header within {self._header_timeout_seconds:g} s; nothing was sent"
                ) from None
            first = None if raw is None else convert.decode(pb.SendStreamRequest, raw, "messages[0]", context)
            if first is None or first.WhichOneof("part") != "header":
                raise _bad_stream("the first message of a stream must be a header")
            header = first.header
            request_context = self.request_context(tenant, header.options, context)
            session = self._sender.open_stream(request_context, convert.trigger_head(header.trigger))
        except Exception as exc:
            await asyncio.wait((reader.drain(),), timeout=self._drain_seconds)
            reader.close()
            await self.abort(context, exc)
        observer.note(summary=session.summary)
        self._metrics.stream_opened(tenant.id)
        try:
            async with contextlib.aclosing(
                self._stream_results(session, reader, header, context)
            ) as responses:
                async for response in responses:
                    yield response
        finally:
            self._metrics.stream_closed(tenant.id)

    async def _stream_results(
        self,
        session: StreamSend,
        reader: StreamReader[bytes],
        header: pb.StreamHeader,
        context: Context,
    ) -> AsyncGenerator[pb.SendStreamResponse, None]:
        """Feed the session from the caller while its results go back, then the summary.

        The last, partial batch is sent only once a write to the caller has succeeded after its
        requests ended (`StreamEnd`): a stream cut off sends none.
        """

        failure: list[BaseException] = []
        end = StreamEnd()
        # The stubs type the callback as a class of theirs; grpcio calls any callable with the context.
        context.add_done_callback(end.rpc_done)  # type: ignore[arg-type]

        encode = None if self._native is None else self._native.chunk

        async def pump() -> None:
            try:
                await session.feed(map(convert.recipient_to_dict, header.trigger.recipients))
                index = 0
                while (raw := await next_message(reader, session, self._idle_timeout_seconds)) is not None:
                    index += 1
                    if encode is not None:
                        encoded = encode(raw, session.context_name, session.encoded_limit)
                        if encoded is not None:
                            await session.feed_encoded(encoded)
                            continue
                    message = convert.decode(pb.SendStreamRequest, raw, f"messages[{index}]", context)
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
                # key and refuse the resume. Without a key the end is taken as the caller's, and a
                # cut-off stream may send its last batch like the others it had accepted (no signal
                # exists for it: see StreamEnd).
                keyed = session.context.scope is not None
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
                async with contextlib.aclosing(results_to_write(session, end, handed)) as results:
                    async for result in results:
                        if result is None:
                            yield pb.SendStreamResponse()
                        else:
                            yield pb.SendStreamResponse(result=convert.result_to_proto(result))
                await pumping
                if failure:  # what the caller still writes is read: give it a while to stop
                    await asyncio.wait((reader.drain(),), timeout=self._drain_seconds)
            except Exception as exc:
                await self.abort(context, exc)
            finally:
                pumping.cancel()
                watching.cancel()
                reader.close()
                session.cancel()
            if failure:
                await self.abort(context, failure[0])
            yield pb.SendStreamResponse(
                summary=convert.summary_to_proto(session.summary, session.context.request_id)
            )
        except (asyncio.CancelledError, GeneratorExit):
            # The RPC was cut off (the caller went away, or shutdown outlasted its grace): what gRPC
            # still buffered is lost, and a caller that had stopped reading never saw the last
            # results handed over. Log them, so that they can be reconciled.
            session.log_unread(handed)
            raise


def _bad_stream(why: str) -> InvalidRequest:
    return InvalidRequest([Violation("header", why, Rule.STREAM_HEADER)])


def add_to_server(servicer: CanvasGatewayServicer, server: grpc.aio.Server) -> None:
    """Register the service with raw-bytes requests, which the servicers decode themselves: the
    send path here, the after-the-fact RPCs on a `queries.ResultQueries` over the same servicer."""
    queries = ResultQueries(servicer)
    handlers: dict[str, grpc.RpcMethodHandler[bytes, Message]] = {
        "Send": grpc.unary_unary_rpc_method_handler(
            servicer.Send, response_serializer=pb.SendResponse.SerializeToString
        ),
        "SendStream": grpc.stream_stream_rpc_method_handler(
            servicer.SendStream, response_serializer=pb.SendStreamResponse.SerializeToString
        ),
        "GetResults": grpc.unary_stream_rpc_method_handler(
            queries.GetResults, response_serializer=pb.GetResultsResponse.SerializeToString
        ),
        "FindRecipient": grpc.unary_unary_rpc_method_handler(
            queries.FindRecipient, response_serializer=pb.FindRecipientResponse.SerializeToString
        ),
        "ListUnknown": grpc.unary_stream_rpc_method_handler(
            queries.ListUnknown, response_serializer=pb.ListUnknownResponse.SerializeToString
        ),
        "Replay": grpc.unary_unary_rpc_method_handler(
            queries.Replay, response_serializer=pb.ReplayResponse.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
