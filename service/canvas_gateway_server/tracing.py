"""OpenTelemetry traces: one server span per RPC, one span per batch, one client span per Braze call.

Off unless the standard `OTEL_TRACES_EXPORTER` names an exporter (`otlp` or `console`; unset or
`none`: off). Off, no SDK is imported or installed and `Tracing.tracer` is None: the observer, the
dispatcher and the Braze client skip every tracing step on one `is None` test. On, this process
gets a `TracerProvider` of its own (not the global one: each gateway in a process, as in tests,
keeps its own) with a batch span processor, the sampler of `OTEL_TRACES_SAMPLER` (default
`parentbased_always_on`) and a resource naming this process: `service.name` (OTEL_SERVICE_NAME,
default `canvas-gateway`), a fresh `service.instance.id`, the worker index, host and pid. The
OTLP exporter is the HTTP/protobuf one and reads its own `OTEL_EXPORTER_OTLP_*` variables.

Why spans of our own rather than the grpc-aio and aiohttp-client instrumentations: the observer
already wraps every RPC (and reads unary requests itself, which the grpc instrumentation would
see as a stream), and `upstream` is the one place a Braze call is made; our spans carry what the
instrumentations cannot know (tenant, batch, outcome, code, dispatch_id), the URL is the one we
built (no key, no query), and propagation to Braze is decided per tenant, where the aiohttp
instrumentation would inject `traceparent` into every request.

No attribute holds a secret: the Braze key travels in a header no span reads, bodies are never
recorded, exceptions are recorded by type name only, and URLs lose any user info and query.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

import yarl
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import __version__
from .errors import ConfigError
from .model import BatchResult

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    from .context import RequestContext
    from .model import Batch
    from .reply import Reply

SERVICE_NAME: Final = "canvas-gateway"
"""`service.name` unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) says otherwise."""
EXPORTERS: Final = ("otlp", "console")
TRACE_HEADERS: Final = ("traceparent", "tracestate")
_PROPAGATOR: Final = TraceContextTextMapPropagator()
_SERVER_ERRORS: Final = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
"""gRPC codes that mark a server span as an error (OpenTelemetry's RPC conventions)."""
_WAITED: ContextVar[list[float] | None] = ContextVar("waited", default=None)
"""The seconds the current batch has waited (budgets, backoffs), while its span records them."""


class Tracing:
    """This process's tracer and its provider; `tracer` is None when tracing is off."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.provider = provider
        self.tracer: Tracer | None = (
            None if provider is None else provider.get_tracer("canvas_gateway_server", __version__)
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str], worker: int | None = None) -> Tracing:
        """Tracing as the OTEL_* variables in `environ` ask (off unless OTEL_TRACES_EXPORTER names an
        exporter). The SDK's own variables (sampler, batch processor, OTLP endpoint, headers,
        timeout) it reads from the process environment itself."""
        names = exporters(environ)
        if not names:
            return cls()
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        chosen: list[SpanExporter] = []
        for name in names:
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                chosen.append(OTLPSpanExporter())
            else:
                chosen.append(ConsoleSpanExporter())
        return cls.with_processors([BatchSpanProcessor(e) for e in chosen], environ, worker)

    @classmethod
    def with_processors(
        cls, processors: Iterable[SpanProcessor], environ: Mapping[str, str], worker: int | None = None
    ) -> Tracing:
        """Tracing on, through `processors` (tests hand an in-memory exporter's)."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        attributes: dict[str, str | int] = {
            "service.version": __version__,
            "service.instance.id": uuid.uuid4().hex,
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
        }
        if environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = environ["OTEL_SERVICE_NAME"]
        elif "service.name=" not in environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
            attributes["service.name"] = SERVICE_NAME
        if worker is not None:
            attributes["canvas_gateway.worker.index"] = worker
        provider = TracerProvider(resource=Resource.create(attributes))
        for processor in processors:
            provider.add_span_processor(processor)
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is left and stop (blocks up to the exporters' timeouts: run it off the loop)."""
        if self.provider is not None:
            self.provider.shutdown()


def exporters(environ: Mapping[str, str]) -> list[str]:
    """The exporters OTEL_TRACES_EXPORTER names (none: tracing off); ConfigError for one this
    gateway cannot run, so that a bad value fails at boot (and in --check-config)."""
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    if not names or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    unknown = sorted(set(names) - set(EXPORTERS))
    if unknown:
        raise ConfigError(f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} unknown (otlp, console or none)")
    protocol = environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    )
    if "otlp" in names and protocol != "http/protobuf":
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} unsupported; use http/protobuf")
    return names


def start_server_span(tracer: Tracer, method: str, metadata: Any) -> tuple[Span, object]:
    """The server span of one RPC, its parent the caller's W3C `traceparent`/`tracestate` in the
    gRPC metadata (a new trace without them), made current; with the token that detaches it."""
    carrier = {k: v for k, v in metadata or () if k in TRACE_HEADERS and isinstance(v, str)}
    parent = _PROPAGATOR.extract(carrier) if carrier else None
    service, _, name = method.lstrip("/").rpartition("/")
    span = tracer.start_span(
        method.lstrip("/"),
        parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        record_exception=False,
        set_status_on_exception=False,
    )
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    return span, token


def end_server_span(
    span: Span, token: object, code: str, error: BaseException | None, extra: Mapping[str, str | int]
) -> None:
    """End an RPC's span with its gRPC code (and what its access line says: `extra`)."""
    otel_context.detach(token)  # type: ignore[arg-type]
    span.set_attribute("rpc.grpc.status_code", _GRPC_CODES.get(code, 2))
    span.set_attributes(extra)
    if code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR))
        unexpected = code == "UNKNOWN" and error is not None  # an exception escaped the handler
        span.set_attribute("error.type", type(error).__name__ if unexpected else code)
    span.end()


_GRPC_CODES: Final = {
    name: number
    for number, name in enumerate(
        (
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        )
    )
}


def exemplar(span: Span | None = None) -> dict[str, str] | None:
    """A histogram exemplar naming `span` (else the current span) when it is sampled; else None."""
    found = (span or trace.get_current_span()).get_span_context()
    if not found.trace_flags.sampled:
        return None
    return {"trace_id": format(found.trace_id, "032x"), "span_id": format(found.span_id, "016x")}


async def traced_batch(
    tracer: Tracer,
    context: RequestContext,
    batch: Batch,
    send: Callable[[RequestContext, Batch], Awaitable[BatchResult]],
) -> BatchResult:
    """`send(context, batch)` inside the batch's span, which tells what became of it."""
    waited = [0.0]
    with tracer.start_as_current_span(
        "batch",
        attributes={
            "canvas_gateway.tenant": context.tenant.id,
            "canvas_gateway.batch.index": batch.index,
            "canvas_gateway.batch.recipients": len(batch.positions),
            "canvas_gateway.batch.broadcast": batch.broadcast,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        token = _WAITED.set(waited)
        try:
            result = await send(context, batch)
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            raise
        finally:
            _WAITED.reset(token)
            span.set_attribute("canvas_gateway.batch.wait_seconds", round(waited[0], 6))
        span.set_attributes(
            {
                "canvas_gateway.batch.outcome": result.outcome.name.lower(),
                "canvas_gateway.batch.code": result.code.name,
                "canvas_gateway.batch.attempts": result.attempts,
                "canvas_gateway.batch.replayed": result.replayed,
            }
        )
        if result.dispatch_id:
            span.set_attribute("canvas_gateway.dispatch_id", result.dispatch_id)
        return result


def timed_sleep(sleep: Callable[[float], Awaitable[None]]) -> Callable[[float], Awaitable[None]]:
    """`sleep`, adding each wait to the current batch span's `wait_seconds`."""

    async def timed(seconds: float) -> None:
        waited = _WAITED.get()
        if waited is not None:
            waited[0] += seconds
        await sleep(seconds)

    return timed


def safe_url(url: yarl.URL) -> str:
    """`url` as a span may show it: without user info, query or fragment."""
    return str(url.with_user(None).with_query(None).with_fragment(None))


def start_client_span(tracer: Tracer, url: yarl.URL) -> Span:
    """A Braze call's client span (HTTP conventions), made current."""
    return tracer.start_span(
        "POST",
        kind=SpanKind.CLIENT,
        attributes={
            "http.request.method": "POST",
            "url.full": safe_url(url),
            "server.address": url.host or "",
            "server.port": url.port or 0,
        },
        record_exception=False,
        set_status_on_exception=False,
    )


def propagation_headers(span: Span) -> dict[str, str]:
    """The `traceparent` (and `tracestate`) naming `span`, for a tenant that has opted in."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return carrier


def end_client_span(span: Span, reply: Reply) -> None:
    """End a Braze call's span with its status code, or the failure's type when none came."""
    if reply.status:
        span.set_attribute("http.response.status_code", reply.status)
    dispatch_id = reply.body.get("dispatch_id") if reply.body is not None else None
    if isinstance(dispatch_id, str):
        span.set_attribute("canvas_gateway.dispatch_id", dispatch_id)
    if reply.failure or reply.status >= 400:
        span.set_attribute("error.type", reply.failure or str(reply.status))
        span.set_status(Status(StatusCode.ERROR))
    span.end()
