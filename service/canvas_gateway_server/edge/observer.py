"""Every RPC observed: a request id, gRPC server metrics, and one access line.

`CallObserver` is a grpc.aio server interceptor. It wraps each method's behavior so that,
inside the RPC's own task, it
- picks the request id (the caller's valid `x-request-id`, else a new one), returns it in the
  initial metadata and makes it the current one for logs (`logs.REQUEST_ID`);
- counts the RPC the go-grpc-prometheus way: started, messages received and sent, handled by
  code, handling time;
- logs one access line (`access`) for the gateway's own service when the RPC ends, with what
  the servicer noted on the `Call` (tenant, summary);
- traces the gateway's own service when tracing is on (`tracing`): one server span per RPC, its
  parent the caller's W3C `traceparent`, current while the RPC runs so that its batches' spans
  are its children; the RPC histogram's exemplar names it;
- reads a unary call's request itself, within `request_timeout_seconds`: grpcio would wait for
  it without a limit before running the handler, so a caller that opens calls and never sends
  their message would hold them, and their connection, for good. Such methods are registered
  with grpcio as request-streaming; their behavior still gets the one message.

Messages are counted where the behavior reads and yields them; a handler that writes with
`context.write` (grpc's health Watch) is counted as started and handled, not per message.

Just over ~300 lines, for a reason: these five jobs wrap the same moments of one call
(`_Observation`), and read best in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc

from .. import tracing
from ..logs import REQUEST_ID
from ..metrics import Metrics
from ..model import Summary
from . import access
from .access import Call

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


REQUEST_ID_KEY: Final = "x-request-id"
_VALID_REQUEST_ID: Final = re.compile(r"^[\x21-\x7e]{1,128}$")
"""A caller's request id is kept when it is 1-128 printable ASCII characters without spaces."""

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # not subscriptable at run time
Context = grpc.aio.ServicerContext[Any, Any]


_CALL: ContextVar[Call | None] = ContextVar("call", default=None)


def note(*, tenant: str | None = None, summary: Summary | None = None) -> None:
    """Note on the current RPC's access line who called and what it did (nothing outside an RPC)."""
    call = _CALL.get()
    if call is not None and tenant is not None:
        call.tenant = tenant
    if call is not None and summary is not None:
        call.summary = summary


def current_request_id() -> str:
    """The request id of the RPC being served; empty outside one."""
    call = _CALL.get()
    return call.request_id if call is not None else ""


def request_id(metadata: Any) -> str:
    """The caller's `x-request-id` when it is valid, else a new random one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID_REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


def status_code(error: BaseException | None, context: Context) -> str:
    """The name of the code an RPC ended with."""
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code: object = context.code()  # None unless the handler aborted or set one
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is not None:
        return "UNKNOWN"  # what grpc answers for an exception that escapes a handler
    return "OK"


def _grpc_type(handler: Handler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


class CallObserver(grpc.aio.ServerInterceptor):
    """Request ids, gRPC metrics and access lines for every RPC; access lines and spans (with a
    `tracer`) for `logged_service` only."""

    def __init__(
        self,
        metrics: Metrics,
        logged_service: str,
        request_timeout_seconds: float | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._tracer = tracer
        self._metrics = metrics
        self._logged_service = logged_service
        self._request_timeout_seconds = request_timeout_seconds
        self._wrapped: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        wrapped = self._wrapped.get(method)
        if wrapped is None:  # one wrapper per method: the handlers themselves never change
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        service, _, name = method.lstrip("/").rpartition("/")
        rpc = (_grpc_type(handler), service, name)
        logged = service == self._logged_service
        read_first = None if handler.request_streaming else self._request_timeout_seconds
        tracer = self._tracer if logged else None
        observe = _Observation(self._metrics, rpc, method, logged, read_first, tracer)
        kinds = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }
        for kind, make in kinds.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                if read_first is not None:  # the request arrives as a stream of (one) message
                    make = kinds[kind.replace("unary_", "stream_", 1)]
                return make(
                    observe.wrap(behavior, handler.request_streaming, handler.response_streaming),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


class _Observation:
    """Wraps one method's behavior; each call runs inside `_observed`."""

    def __init__(
        self,
        metrics: Metrics,
        rpc: tuple[str, str, str],
        method: str,
        logged: bool,
        read_first: float | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._tracer = tracer
        self._metrics = metrics
        self._rpc = rpc
        self._method = method
        self._logged = logged
        self._read_first = read_first

    def wrap(
        self, behavior: Callable[..., Any], request_streaming: bool, response_streaming: bool
    ) -> Callable[..., Any]:
        metrics, rpc, read_first = self._metrics, self._rpc, self._read_first

        async def counted(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for message in requests:
                metrics.rpc_received(rpc)
                yield message

        def requests_of(request: Any) -> Any:
            if request_streaming:
                return counted(request)
            metrics.rpc_received(rpc)
            return request

        if inspect.isasyncgenfunction(behavior):

            async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
                async with self._observed(context):
                    if read_first is not None:
                        request = await first_message(request, context, read_first)
                    async for response in behavior(requests_of(request), context):
                        metrics.rpc_sent(rpc)
                        yield response

            return streaming

        async def returning(request: Any, context: Context) -> Any:
            async with self._observed(context, overlap_header=True):
                if read_first is not None:
                    request = await first_message(request, context, read_first)
                response = await behavior(requests_of(request), context)
                if not response_streaming:
                    metrics.rpc_sent(rpc)
                return response

        return returning

    @asynccontextmanager
    async def _observed(self, context: Context, overlap_header: bool = False) -> AsyncIterator[None]:
        """Around one call: its request id and `Call` first; its code, time and access line last.

        The request id goes out in the initial metadata. gRPC sends that as an operation of its
        own; a unary call (`overlap_header`) does not wait for it before its work, only before
        its answer, which saves the round trip's latency (a stream's first write must follow it)."""
        started = time.perf_counter()
        metadata = context.invocation_metadata()
        call = Call(request_id(metadata), self._method, context.peer() or "-")
        span = None
        if self._tracer is not None:
            span, token = tracing.start_server_span(self._tracer, self._method, metadata)
        _CALL.set(call)
        REQUEST_ID.set(call.request_id)
        self._metrics.rpc_started(self._rpc)
        header: asyncio.Future[None] | None = None
        if self._logged:
            sending = context.send_initial_metadata(((REQUEST_ID_KEY, call.request_id),))
            if overlap_header:
                header = call.header = asyncio.ensure_future(sending)
            else:
                await sending
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            if header is not None:
                await _settle(header, cancelled=isinstance(error, asyncio.CancelledError))
            seconds = time.perf_counter() - started
            code = status_code(error, context)
            trace = None
            if span is not None:
                trace = tracing.exemplar(span)
                tracing.end_server_span(span, token, code, error, _traced(call))
            self._metrics.rpc_handled(self._rpc, code, seconds, trace)
            if self._logged:
                access.line(call, code, seconds, None if code == "OK" else access.details(context))


async def first_message(requests: AsyncIterator[Any], context: Context, seconds: float) -> Any:
    """A unary call's request, read from its stream within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            message = await anext(requests, None)
    except TimeoutError:
        await header_sent()
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"no request message within {seconds:g} s; nothing was done"
        )
    if message is None:
        await header_sent()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without its request message")
    return message


async def header_sent() -> None:
    """Wait until the current call's initial metadata has gone out: before an error status,
    which gRPC sends at once, so that failed calls carry their request id too."""
    call = _CALL.get()
    if call is not None and call.header is not None:
        await _settle(call.header, cancelled=False)


async def _settle(header: asyncio.Future[None], cancelled: bool) -> None:
    """Let the initial metadata go out before the answer (or the error) does; a call cut off
    needs none."""
    if cancelled:
        header.cancel()
        return
    with contextlib.suppress(Exception):  # the call ended first (the caller went away)
        await header


def _traced(call: Call) -> dict[str, str | int]:
    """What the server span tells besides its code: the access line's request id, tenant and counts."""
    summary = call.summary or Summary()
    return {
        "canvas_gateway.request_id": call.request_id,
        "canvas_gateway.tenant": call.tenant,
        "canvas_gateway.recipients": summary.recipients,
        "canvas_gateway.batches": summary.batches,
    }
