"""Tracing end to end: a caller's W3C traceparent through real gRPC on 127.0.0.1 to the fake Braze.

Spans are collected in-process with the SDK's in-memory exporter (a gateway handed its own
`Tracing`), and, for the OTLP path configured by OTEL_* variables alone, by a real Jaeger v2 on
127.0.0.1 (tests/jaeger: `make jaeger-install` builds it), asked through its query API, from gateway
processes (one, and a supervisor with two workers).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import redis.asyncio as aioredis
import yarl
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_server.app import Gateway
from canvas_gateway_server.errors import ConfigError
from canvas_gateway_server.settings import Settings
from canvas_gateway_server.tenants import token_digest
from canvas_gateway_server.tracing import Tracing, safe_url
from fake_braze import FakeBraze, Fault
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from servers import binary, jaeger, start_replica, stop_process
from support import FAKE_URLS, KEYS, LOCAL, TOKENS, Harness, free_port, tenants_toml, trigger_from_json, until

CANVAS = "8c7c2864-26b2-4ad0-97ec-48cddfd497d7"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
HOOLI_TOKEN = "token-hooli-5a5a"
HOOLI_KEY = "braze-key-hooli-4444"
REDIS_PASSWORD = "redis-password-8e8e"
SEND = "canvas_gateway.v1.CanvasGatewayService/Send"
STREAM = "canvas_gateway.v1.CanvasGatewayService/SendStream"


def caller(trace_id: str = TRACE_ID, sampled: bool = True) -> tuple[tuple[str, str], ...]:
    """The metadata a Go or Java caller's OpenTelemetry SDK sends, written out by hand."""
    return (
        ("traceparent", f"00-{trace_id}-{CALLER_SPAN}-{'01' if sampled else '00'}"),
        ("tracestate", "vendor=caller-state"),
    )


def auth(tenant: str = "acme") -> tuple[tuple[str, str], ...]:
    token = HOOLI_TOKEN if tenant == "hooli" else TOKENS[tenant]
    return (("authorization", f"Bearer {token}"),)


def recipients(start: int, stop: int) -> list[dict[str, Any]]:
    return [{"external_user_id": f"user-{i}", "context": {"i": i}} for i in range(start, stop)]


def send_request(n: int) -> pb.SendRequest:
    return pb.SendRequest(trigger=trigger_from_json({"canvas_id": CANVAS, "recipients": recipients(0, n)}))


async def stream_requests(n: int, size: int = 50) -> AsyncIterator[pb.SendStreamRequest]:
    yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=trigger_from_json({"canvas_id": CANVAS})))
    for start in range(0, n, size):
        chunk = trigger_from_json({"canvas_id": "x", "recipients": recipients(start, min(start + size, n))})
        yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=chunk.recipients))


def traced_tenants(url: str) -> str:
    """The harness's tenants, and `hooli`, which asks for its trace to go to Braze (with a key the
    fake refuses: its calls are answered 401)."""
    return tenants_toml(url) + (
        "\n[tenants.hooli]\n"
        f'token_sha256 = ["{token_digest(HOOLI_TOKEN)}"]\n'
        f'braze_rest_url = "{url}"\n'
        f'braze_api_key = "{HOOLI_KEY}"\n'
        "propagate_trace = true\n"
    )


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced(fake: FakeBraze, tmp_path: Path, exporter: InMemorySpanExporter) -> AsyncIterator[Harness]:
    """A gateway tracing into `exporter`, serving acme, globex, initech and hooli."""
    async with tracing_gateway(fake, tmp_path, exporter) as harness:
        yield harness


@asynccontextmanager
async def tracing_gateway(
    fake: FakeBraze, tmp_path: Path, exporter: InMemorySpanExporter, **settings: Any
) -> AsyncIterator[Harness]:
    """The `traced` gateway, with more `settings`."""
    tenants_file = tmp_path / "tenants.toml"
    tenants_file.write_text(traced_tenants(FAKE_URLS[id(fake)]))
    found = Settings.from_env(
        {},
        grpc_address="127.0.0.1:0",
        tenants_file=str(tenants_file),
        retry_base_delay_seconds=0.01,
        **{**LOCAL, **settings},
    )
    tracing = Tracing.with_processors([SimpleSpanProcessor(exporter)], {})
    gateway = await Gateway.start(found, environ={"ACME_BRAZE_KEY": KEYS["acme"]}, tracing=tracing)
    target = f"127.0.0.1:{gateway.port}"
    channel = grpc.aio.insecure_channel(target)
    try:
        yield Harness(gateway, fake, channel, pb_grpc.CanvasGatewayServiceStub(channel), target)
    finally:
        await channel.close()
        await gateway.stop(grace=0)


def of_kind(spans: Sequence[ReadableSpan], kind: SpanKind, name: str | None = None) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind and (name is None or s.name == name)]


async def finished(exporter: InMemorySpanExporter, servers: int = 1) -> Sequence[ReadableSpan]:
    """The spans once `servers` server spans have ended (an RPC's span ends as its answer goes)."""
    await until(lambda: len(of_kind(exporter.get_finished_spans(), SpanKind.SERVER)) >= servers)
    return exporter.get_finished_spans()


def index_of(span: ReadableSpan) -> int:
    index = (span.attributes or {})["canvas_gateway.batch.index"]
    assert isinstance(index, int)
    return index


def check_tree(spans: Sequence[ReadableSpan], method: str, sizes: list[int]) -> None:
    """One connected trace: the caller's span -> one server span -> a batch span per batch -> one
    client span each."""
    (server,) = of_kind(spans, SpanKind.SERVER, method)
    assert server.context is not None and server.parent is not None
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(server.parent.span_id, "016x") == CALLER_SPAN and server.parent.is_remote
    assert server.context.trace_state.get("vendor") == "caller-state"
    assert server.attributes is not None
    assert server.attributes["rpc.system"] == "grpc" and server.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["canvas_gateway.tenant"] == "acme"
    assert server.attributes["canvas_gateway.recipients"] == sum(sizes)
    batches = sorted((s for s in spans if s.name == "batch"), key=index_of)
    assert [(b.attributes or {})["canvas_gateway.batch.recipients"] for b in batches] == sizes
    clients = of_kind(spans, SpanKind.CLIENT)
    assert len(clients) == len(sizes)
    for index, batch in enumerate(batches):
        attributes = batch.attributes or {}
        assert batch.parent is not None and batch.parent.span_id == server.context.span_id
        assert attributes["canvas_gateway.batch.index"] == index
        assert attributes["canvas_gateway.batch.outcome"] == "sent"
        assert attributes["canvas_gateway.batch.code"] == "OK"
        assert attributes["canvas_gateway.batch.attempts"] == 1
        assert isinstance(attributes["canvas_gateway.batch.wait_seconds"], float)
        assert batch.context is not None
        (client,) = [c for c in clients if c.parent is not None and c.parent.span_id == batch.context.span_id]
        assert client.context is not None and client.context.trace_id == server.context.trace_id
        assert (client.attributes or {})["canvas_gateway.dispatch_id"] == attributes[
            "canvas_gateway.dispatch_id"
        ]


async def test_a_callers_traceparent_parents_the_send_its_batches_and_their_calls(
    traced: Harness, exporter: InMemorySpanExporter
) -> None:
    response = await traced.stub.Send(send_request(120), metadata=auth() + caller(), timeout=30)
    assert response.summary.recipients_sent == 120
    spans = await finished(exporter)
    check_tree(spans, SEND, [50, 50, 20])
    url = f"{FAKE_URLS[id(traced.fake)]}/canvas/trigger/send"
    dispatch_ids = {c.dispatch_id for c in traced.fake.calls}
    for client in of_kind(spans, SpanKind.CLIENT):
        attributes = client.attributes or {}
        assert client.name == "POST"
        assert attributes["http.request.method"] == "POST" and attributes["url.full"] == url
        assert attributes["http.response.status_code"] == 201
        assert attributes["server.address"] == "127.0.0.1"
        assert attributes["canvas_gateway.dispatch_id"] in dispatch_ids
    # acme did not opt in: Braze sees no trace of ours
    assert [c.header("traceparent") for c in traced.fake.calls] == [None, None, None]
    assert [c.header("tracestate") for c in traced.fake.calls] == [None, None, None]


async def test_a_stream_of_200_is_one_trace(traced: Harness, exporter: InMemorySpanExporter) -> None:
    results = [r async for r in traced.stub.SendStream(stream_requests(200), metadata=auth() + caller())]
    assert sum(len(r.result.positions) for r in results if r.HasField("result")) == 200
    check_tree(await finished(exporter), STREAM, [50, 50, 50, 50])


async def test_a_tenant_that_opted_in_sends_the_calls_traceparent(
    traced: Harness, exporter: InMemorySpanExporter
) -> None:
    await traced.stub.Send(send_request(60), metadata=auth("hooli") + caller(), timeout=30)
    clients = of_kind(await finished(exporter), SpanKind.CLIENT)
    sent = sorted(c.header("traceparent") or "" for c in traced.fake.calls)
    expected = sorted(f"00-{TRACE_ID}-{format(c.context.span_id, '016x')}-01" for c in clients if c.context)
    assert sent == expected and len(sent) == 2
    assert {c.header("tracestate") for c in traced.fake.calls} == {"vendor=caller-state"}


async def test_an_unsampled_caller_is_not_recorded_and_a_call_without_one_starts_a_trace(
    traced: Harness, exporter: InMemorySpanExporter
) -> None:
    await traced.stub.Send(send_request(10), metadata=auth() + caller(sampled=False), timeout=30)
    await traced.stub.Send(send_request(10), metadata=auth(), timeout=30)
    spans = await finished(exporter)
    (server,) = of_kind(spans, SpanKind.SERVER)  # parentbased_always_on follows the caller's "no"
    assert server.parent is None and server.context is not None
    assert format(server.context.trace_id, "032x") != TRACE_ID


async def test_a_retried_batch_shows_its_attempts_and_its_wait(
    traced: Harness, exporter: InMemorySpanExporter
) -> None:
    traced.fake.faults.script([Fault.status(429)])  # no reset header: retried after the base delay
    await traced.stub.Send(send_request(10), metadata=auth() + caller(), timeout=30)
    spans = await finished(exporter)
    (batch,) = [s for s in spans if s.name == "batch"]
    attributes = batch.attributes or {}
    assert (
        attributes["canvas_gateway.batch.attempts"] == 2
        and attributes["canvas_gateway.batch.outcome"] == "sent"
    )
    wait = attributes["canvas_gateway.batch.wait_seconds"]
    assert isinstance(wait, float) and wait >= 0.01
    first, second = sorted(of_kind(spans, SpanKind.CLIENT), key=lambda s: s.start_time or 0)
    assert (first.attributes or {})["http.response.status_code"] == 429
    assert (first.attributes or {})["error.type"] == "429" and not first.status.is_ok
    assert (second.attributes or {})["http.response.status_code"] == 201 and "error.type" not in (
        second.attributes or {}
    )


async def test_a_call_without_an_answer_says_what_failed(
    traced: Harness, exporter: InMemorySpanExporter
) -> None:
    traced.fake.faults.script([Fault.reset()])  # after the request went out: not retried
    await traced.stub.Send(send_request(10), metadata=auth() + caller(), timeout=30)
    spans = await finished(exporter)
    (client,) = of_kind(spans, SpanKind.CLIENT)
    attributes = client.attributes or {}
    failure = attributes["error.type"]
    assert (
        "http.response.status_code" not in attributes
        and isinstance(failure, str)
        and failure.endswith("Error")
    )
    (batch,) = [s for s in spans if s.name == "batch"]
    assert (batch.attributes or {})["canvas_gateway.batch.outcome"] == "unknown"


async def test_a_stream_cut_off_ends_its_spans(
    traced: Harness, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    traced.fake.faults.script([Fault.delay(10.0)])
    call = traced.stub.SendStream(stream_requests(50), metadata=auth() + caller())
    await until(lambda: traced.fake.in_progress == 1)
    call.cancel()
    (server,) = of_kind(await finished(exporter), SpanKind.SERVER)
    assert (server.attributes or {})["rpc.grpc.status_code"] == 1
    await until(lambda: len(of_kind(exporter.get_finished_spans(), SpanKind.CLIENT)) == 1)
    assert not [r for r in caplog.records if "detach" in r.getMessage()]  # the context was the RPC's


async def test_a_caller_that_goes_away_ends_every_span(
    traced: Harness, exporter: InMemorySpanExporter
) -> None:
    traced.fake.faults.script([Fault.delay(10.0)])
    call = traced.stub.Send(send_request(10), metadata=auth() + caller(), timeout=30)
    await until(lambda: traced.fake.in_progress == 1)
    call.cancel()
    spans = await finished(exporter)
    (server,) = of_kind(spans, SpanKind.SERVER)
    assert (server.attributes or {})["rpc.grpc.status_code"] == 1  # CANCELLED
    (batch,) = [s for s in spans if s.name == "batch"]
    (client,) = of_kind(spans, SpanKind.CLIENT)
    assert (batch.attributes or {})["error.type"] == "CancelledError"
    assert (client.attributes or {})["error.type"] == "CancelledError"


async def test_an_error_status_marks_the_server_span(traced: Harness, exporter: InMemorySpanExporter) -> None:
    traced.gateway.shutting_down.set()  # as in a shutdown: new sends are refused UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await traced.stub.Send(send_request(1), metadata=auth() + caller(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    (server,) = of_kind(await finished(exporter), SpanKind.SERVER)
    assert not server.status.is_ok and (server.attributes or {})["error.type"] == "UNAVAILABLE"
    assert (server.attributes or {})["rpc.grpc.status_code"] == 14


async def sends_of_every_kind(h: Harness) -> None:
    """A Send under a key, an opted-in tenant's Send (answered 401), a stream, a refused token."""
    options = pb.SendOptions(idempotency_key="key-1")
    request = pb.SendRequest(trigger=send_request(60).trigger, options=options)
    keyed = await h.stub.Send(request, metadata=auth() + caller(), timeout=30)
    assert {r.outcome for r in keyed.results} == {pb.OUTCOME_SENT}  # its key kept in Redis, by password
    await h.stub.Send(send_request(60), metadata=auth("hooli") + caller(), timeout=30)
    [r async for r in h.stub.SendStream(stream_requests(60), metadata=auth("globex") + caller())]
    with pytest.raises(grpc.aio.AioRpcError):
        await h.stub.Send(send_request(1), metadata=(("authorization", "Bearer not-a-token"),))


@asynccontextmanager
async def redis_with_password(password: str) -> AsyncIterator[str]:
    """A redis-server on 127.0.0.1 that asks for `password`; its URL, with the password in it."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        binary("redis-server", "REDIS_SERVER_BIN"),
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--requirepass", password),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    client = aioredis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1)

    async def answers() -> bool:
        try:
            return bool(await client.ping())
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
            return False

    try:
        for _ in range(200):
            if await answers():
                break
            await asyncio.sleep(0.05)
        yield f"redis://:{password}@127.0.0.1:{port}/0"
    finally:
        await client.aclose()
        await stop_process(process)


async def test_no_secret_in_any_span(fake: FakeBraze, tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    """hooli's key is not one the fake knows: its calls get Braze's 401, whose text echoes the key;
    budgets and keys' results are kept in a Redis that asks for a password."""
    async with (
        redis_with_password(REDIS_PASSWORD) as url,
        tracing_gateway(fake, tmp_path, exporter, redis_url=url) as traced,
    ):
        await sends_of_every_kind(traced)
    spans = await finished(exporter, servers=4)
    assert any((s.attributes or {}).get("http.response.status_code") == 401 for s in spans)
    shown = json.dumps(
        [
            {
                "name": s.name,
                "attributes": dict(s.attributes or {}),
                "events": [(e.name, dict(e.attributes or {})) for e in s.events],
                "resource": dict(s.resource.attributes),
                "status": s.status.description,
                "links": [dict(link.attributes or {}) for link in s.links],
            }
            for s in spans
        ]
    )
    secrets = [
        *KEYS.values(),
        *TOKENS.values(),
        HOOLI_KEY,
        HOOLI_TOKEN,
        "not-a-token",
        "Bearer",
        REDIS_PASSWORD,
    ]
    for secret in secrets:
        assert secret not in shown
    assert "url.full" in shown and "canvas_gateway.tenant" in shown  # what was grepped is there


async def test_latency_histograms_carry_trace_ids_in_openmetrics(
    traced: Harness, exporter: InMemorySpanExporter
) -> None:
    await traced.stub.Send(send_request(10), metadata=auth() + caller(), timeout=30)
    await finished(exporter)
    admin = f"http://127.0.0.1:{traced.gateway.admin_port}/metrics"
    async with aiohttp.ClientSession() as session:
        async with session.get(admin, headers={"Accept": "application/openmetrics-text"}) as reply:
            openmetrics = await reply.text()
        async with session.get(admin) as reply:
            text = await reply.text()
    for family in (
        "grpc_server_handling_seconds_bucket",
        "canvas_gateway_braze_request_duration_seconds_bucket",
    ):
        lines = [line for line in openmetrics.splitlines() if line.startswith(family) and " # {" in line]
        assert lines, family
        assert all(re.search(r'trace_id="' + TRACE_ID + '"', line) for line in lines)
    assert TRACE_ID not in text  # the Prometheus text format has no exemplars


async def test_tracing_off_sends_no_trace_and_keeps_no_exemplar(harness: Harness) -> None:
    await harness.stub.Send(send_request(10), metadata=auth() + caller(), timeout=30)
    assert harness.gateway.tracing.tracer is None
    assert [c.header("traceparent") for c in harness.fake.calls] == [None]
    admin = f"http://127.0.0.1:{harness.gateway.admin_port}/metrics"
    headers = {"Accept": "application/openmetrics-text"}
    async with aiohttp.ClientSession() as session, session.get(admin, headers=headers) as reply:
        assert TRACE_ID not in await reply.text()


@pytest.mark.parametrize(
    "environ",
    [{}, {"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}],
)
def test_off_unless_an_exporter_is_named(environ: dict[str, str]) -> None:
    tracing = Tracing.from_env(environ)
    assert tracing.tracer is None and tracing.provider is None
    tracing.shutdown()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, "jaeger unknown"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "'grpc' unsupported"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "unsupported"),
    ],
)
def test_an_exporter_it_cannot_run_fails_at_boot(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Tracing.from_env(environ)


def test_console_exporter_and_the_resource() -> None:
    tracing = Tracing.from_env({"OTEL_TRACES_EXPORTER": "console"}, worker=3)
    other = Tracing.from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "mine"})
    assert tracing.tracer is not None and tracing.provider is not None and other.provider is not None
    resource, resource_of_other = tracing.provider.resource.attributes, other.provider.resource.attributes
    assert resource["service.name"] == "canvas-gateway" and resource["canvas_gateway.worker.index"] == 3
    assert resource_of_other["service.name"] == "mine"
    assert "canvas_gateway.worker.index" not in resource_of_other
    assert resource["service.instance.id"] != resource_of_other["service.instance.id"]
    tracing.shutdown()
    other.shutdown()


def test_a_url_in_a_span_has_no_user_info_or_query() -> None:
    url = yarl.URL("https://user:secret@rest.iad-01.braze.com/canvas/trigger/send?api_key=k#f")
    assert safe_url(url) == "https://rest.iad-01.braze.com/canvas/trigger/send"


STREAM_TRACE = "f" * 32
OTLP = {
    "OTEL_TRACES_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    "OTEL_SERVICE_NAME": "cgw-under-test",
    "OTEL_BSP_SCHEDULE_DELAY": "50",
}


async def traced_sends(address: str, count: int) -> None:
    """`count` Sends of 120, each on a channel (a connection) of its own, with its own trace id
    (1, 2, ...), then a stream of 200 with trace id `ff...`."""
    for i in range(count):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.CanvasGatewayServiceStub(channel)
            await stub.Send(send_request(120), metadata=auth() + caller(f"{i + 1:032x}"), timeout=30)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CanvasGatewayServiceStub(channel)
        [r async for r in stub.SendStream(stream_requests(200), metadata=auth() + caller(STREAM_TRACE))]


def tags(item: dict[str, Any]) -> dict[str, Any]:
    """A span's or a process's tags in Jaeger's JSON, as a dict."""
    return {tag["key"]: tag["value"] for tag in item.get("tags") or []}


def parent(span: dict[str, Any]) -> str:
    """The span id of a span's parent, from its one CHILD_OF reference in Jaeger's JSON."""
    (reference,) = span["references"]
    assert reference["refType"] == "CHILD_OF" and reference["traceID"] == span["traceID"]
    return str(reference["spanID"])


def check_jaeger_trace(trace: dict[str, Any], method: str, sizes: list[int], url: str) -> dict[str, Any]:
    """One connected trace as Jaeger shows it: the caller's span -> one server span -> a batch span
    per batch -> one client span (the Braze call) each, every span from one process. That process's
    tags (the resource)."""
    spans: list[dict[str, Any]] = trace["spans"]
    assert len(spans) == 1 + 2 * len(sizes)
    assert {s["processID"] for s in spans} == {spans[0]["processID"]}
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_kind.setdefault(tags(span)["span.kind"], []).append(span)
    assert sorted(by_kind) == ["client", "internal", "server"]
    (server,) = by_kind["server"]
    attributes = tags(server)
    assert server["operationName"] == method and parent(server) == CALLER_SPAN
    assert attributes["rpc.system"] == "grpc" and attributes["rpc.grpc.status_code"] == 0
    assert attributes["rpc.service"] == "canvas_gateway.v1.CanvasGatewayService"
    assert attributes["rpc.method"] == method.rsplit("/", 1)[1]
    assert attributes["canvas_gateway.tenant"] == "acme"
    assert attributes["canvas_gateway.recipients"] == sum(sizes)
    assert attributes["w3c.tracestate"] == "vendor=caller-state"
    batches = sorted(by_kind["internal"], key=lambda s: tags(s)["canvas_gateway.batch.index"])
    assert [tags(b)["canvas_gateway.batch.recipients"] for b in batches] == sizes
    clients = {parent(c): tags(c) for c in by_kind["client"]}
    assert len(clients) == len(sizes)  # one call under each batch
    for index, batch in enumerate(batches):
        attributes = tags(batch)
        assert batch["operationName"] == "batch" and parent(batch) == server["spanID"]
        assert attributes["canvas_gateway.batch.index"] == index
        assert attributes["canvas_gateway.batch.outcome"] == "sent"
        assert attributes["canvas_gateway.batch.code"] == "OK"
        assert attributes["canvas_gateway.batch.attempts"] == 1
        call = clients[batch["spanID"]]
        assert call["http.request.method"] == "POST" and call["url.full"] == url
        assert call["http.response.status_code"] == 201
        assert call["canvas_gateway.dispatch_id"] == attributes["canvas_gateway.dispatch_id"]
    process: dict[str, Any] = trace["processes"][spans[0]["processID"]]
    assert process["serviceName"] == "cgw-under-test"
    return tags(process)


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_otel_variables_alone_send_connected_traces_to_jaeger_from_every_process(
    fake: FakeBraze, tmp_path: Path, workers: str
) -> None:
    """A gateway process configured by OTEL_* variables alone, exporting to a real Jaeger on
    127.0.0.1: six Sends of 120 and a stream of 200, each under a caller's traceparent, are one
    connected trace each in Jaeger's query API, from one process that names its worker."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    url = f"{FAKE_URLS[id(fake)]}/canvas/trigger/send"
    async with jaeger() as found, aiohttp.ClientSession() as session:
        endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": found.otlp_endpoint}
        replica = await start_replica(
            tenants, session, CGW_WORKERS=workers, CGW_SHUTDOWN_DELAY_SECONDS="0", **OTLP, **endpoint
        )
        try:
            await traced_sends(replica.address, 6)
        finally:
            assert await stop_process(replica.process) == 0  # its last spans go at shutdown
        assert await found.services() == ["cgw-under-test"]
        resources = []
        for i in range(6):
            trace = await found.trace(f"{i + 1:032x}")
            assert trace is not None, i
            resources.append(check_jaeger_trace(trace, SEND, [50, 50, 20], url))
        trace = await found.trace(STREAM_TRACE)
        assert trace is not None
        resources.append(check_jaeger_trace(trace, STREAM, [50, 50, 50, 50], url))
        assert await found.trace("e" * 32) is None  # a trace id nobody sent
    dispatched = {call.dispatch_id for call in fake.calls}
    assert len(dispatched) == len(fake.calls) == 6 * 3 + 4
    instances = {r["service.instance.id"]: r.get("canvas_gateway.worker.index") for r in resources}
    if workers == "1":
        assert list(instances.values()) == [None]
    else:  # every worker that served names itself
        assert set(instances.values()) <= {0, 1} and None not in instances.values()
        assert len(instances) == len(set(instances.values()))


async def test_no_otel_variables_nothing_reaches_jaeger(fake: FakeBraze, tmp_path: Path) -> None:
    """Tracing off (no OTEL_TRACES_EXPORTER), the endpoint alone turns nothing on: the same sends
    leave Jaeger without a service or a trace."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    async with jaeger() as found, aiohttp.ClientSession() as session:
        replica = await start_replica(tenants, session, OTEL_EXPORTER_OTLP_ENDPOINT=found.otlp_endpoint)
        try:
            await traced_sends(replica.address, 2)
        finally:
            assert await stop_process(replica.process) == 0
        assert await found.services() == []
        for trace_id in (f"{1:032x}", f"{2:032x}", STREAM_TRACE):
            assert await found.trace(trace_id) is None
    assert len(fake.calls) == 2 * 3 + 4
