"""The running gateway: health, reflection, SIGHUP reload, demo mode, graceful shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_server.app import Gateway
from canvas_gateway_server.demo import DEMO_TOKEN
from canvas_gateway_server.edge.servicer import SERVICE_NAME
from canvas_gateway_server.errors import ConfigError
from canvas_gateway_server.settings import Settings
from canvas_gateway_server.tenants import token_digest
from fake_braze import Fault
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from support import (
    FAKE_URLS,
    KEYS,
    LOCAL,
    Harness,
    health_check,
    health_watch,
    learn_budget,
    tenants_toml,
    until,
)

REQUEST = pb.SendRequest(
    trigger=pb.CanvasTrigger(
        canvas_id="c", recipients=[pb.Recipient(external_user_id=f"u{i}") for i in range(60)]
    )
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def batches_in_flight(harness: Harness) -> float | None:
    """acme's batches waiting for a rate-limit slot or calling Braze, from the gateway's metrics."""
    return harness.gateway.registry.get_sample_value("canvas_gateway_batches_in_flight", {"tenant": "acme"})


async def test_health_reports_serving(harness: Harness) -> None:
    for service in ("", SERVICE_NAME):
        assert (await health_check(harness, service)).status == SERVING


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_and_describes_the_services(harness: Harness, version: str) -> None:
    """Both protocol names answer (their messages are the same on the wire), v1 describing itself too."""
    info = harness.channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    symbols = (SERVICE_NAME, "canvas_gateway.v1.BatchResult", "grpc.reflection.v1.ServerReflection")

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        for symbol in symbols:
            yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)

    replies = [reply async for reply in info(ask())]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names
    for symbol, reply in zip(symbols, replies[1:], strict=True):
        assert not reply.HasField("error_response"), symbol
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in reply.file_descriptor_response.file_descriptor_proto
        ]
        assert symbol.rsplit(".", 1)[0] in {f.package for f in files}


async def test_sighup_reload_rotates_tokens_without_restart(harness: Harness, tmp_path: Path) -> None:
    tenants_file = Path(harness.gateway.settings.tenants.file)
    text = tenants_toml(FAKE_URLS[id(harness.fake)]).replace(
        token_digest("token-acme-4f1c"), token_digest("token-acme-rotated")
    )
    tenants_file.write_text(text)
    harness.gateway.reload_tenants()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Send(REQUEST, metadata=harness.auth("acme"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = await harness.stub.Send(REQUEST, metadata=(("authorization", "Bearer token-acme-rotated"),))
    assert reply.summary.recipients_sent == 60
    assert {c.api_key for c in harness.fake.calls} == {KEYS["acme"]}

    tenants_file.write_text("broken [")  # a bad reload keeps the tenants we had
    harness.gateway.reload_tenants()
    reply = await harness.stub.Send(REQUEST, metadata=(("authorization", "Bearer token-acme-rotated"),))
    assert reply.summary.recipients_sent == 60


async def test_graceful_shutdown_finishes_in_flight_batches(harness: Harness) -> None:
    await learn_budget(harness)  # then both batches go at once
    harness.fake.faults.set_latency(1.0)
    watch = health_watch(harness)
    assert (await anext(watch)).status == SERVING

    in_flight = asyncio.ensure_future(harness.stub.Send(REQUEST, metadata=harness.auth()))
    await until(lambda: harness.fake.in_progress == 2)  # both its batches are at the fake Braze
    began = time.monotonic()
    stopping = asyncio.create_task(harness.gateway.stop(grace=30))
    update = await asyncio.wait_for(anext(watch), 5)
    assert update.status == NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # new work is turned away while draining
        await harness.stub.Send(REQUEST, metadata=harness.auth(), timeout=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (refused.value.details() or "")
    reply = await in_flight
    await stopping
    assert reply.summary.recipients_sent == 60  # finished, not cut off
    assert time.monotonic() - began < 10  # done with our RPCs, it did not wait out the grace for the watcher
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Send(REQUEST, metadata=harness.auth(), timeout=2)
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_demo_mode_runs_against_the_embedded_fake() -> None:
    settings = Settings.from_env({}, demo=True, demo_braze_port=0, grpc_address="127.0.0.1:0", **LOCAL)
    gateway = await Gateway.start(settings)
    try:
        assert gateway.fake_braze is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = pb_grpc.CanvasGatewayServiceStub(channel)
            reply = await stub.Send(REQUEST, metadata=(("authorization", f"Bearer {DEMO_TOKEN}"),))
        assert reply.summary.recipients_sent == 60
        assert len(gateway.fake_braze.calls) == 2
    finally:
        await gateway.stop(grace=0)


async def test_shutdown_ends_open_streams_with_every_read_recipient_accounted_for(harness: Harness) -> None:
    harness.fake.faults.set_latency(0.2)
    hold = asyncio.Event()

    async def requests() -> AsyncIterator[pb.SendStreamRequest]:
        yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c")))
        recipients = [pb.Recipient(external_user_id=f"u{i}") for i in range(120)]
        yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients))
        await hold.wait()  # the caller keeps the stream open: more would come

    results: list[pb.BatchResult] = []
    call = harness.stub.SendStream(requests(), metadata=harness.auth())

    async def read() -> None:
        async for response in call:
            results.append(response.result)

    reading = asyncio.create_task(read())
    await until(lambda: bool(harness.fake.calls))
    await harness.gateway.stop(grace=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reading
    hold.set()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "from position 120 on" in (caught.value.details() or "")
    (details,) = [v for k, v in caught.value.trailing_metadata() or () if k == "grpc-status-details-bin"]
    assert isinstance(details, bytes)
    retry, packed = status_pb2.Status.FromString(details).details
    info, retry_info = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert packed.Unpack(info) and retry.Unpack(retry_info)
    assert retry_info.retry_delay.ToSeconds() == 0
    assert (info.domain, info.reason, dict(info.metadata)) == (
        "canvas-gateway.internal",
        "DRAINING",
        {"resume_position": "120"},
    )
    assert sorted(p for r in results for p in r.positions) == list(range(120))
    assert sorted(len(r.positions) for r in results if r.outcome == pb.OUTCOME_SENT) == [50, 50]
    (unsent,) = [r for r in results if r.outcome == pb.OUTCOME_NOT_ATTEMPTED]
    assert list(unsent.positions) == list(range(100, 120))
    assert unsent.retryable


async def test_a_reload_does_not_disturb_requests_in_flight(harness: Harness) -> None:
    harness.fake.faults.set_latency(0.3)
    in_flight = asyncio.ensure_future(harness.stub.Send(REQUEST, metadata=harness.auth("acme")))
    await until(lambda: harness.gateway.servicer.in_flight.busy)
    text = tenants_toml(FAKE_URLS[id(harness.fake)])
    globex_only = text[text.index("[tenants.globex]") :]
    Path(harness.gateway.settings.tenants.file).write_text(globex_only)
    harness.gateway.reload_tenants()  # acme is gone for new requests

    reply = await in_flight
    assert reply.summary.recipients_sent == 60
    assert {c.api_key for c in harness.fake.calls} == {KEYS["acme"]}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Send(REQUEST, metadata=harness.auth("acme"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("settings_overrides", [{"request_concurrency": 1}])
async def test_past_the_grace_period_batches_are_abandoned_with_honest_results(harness: Harness) -> None:
    harness.fake.faults.script([Fault.delay(0), Fault.delay(5.0)])  # the second call hangs
    request = pb.SendRequest(
        trigger=pb.CanvasTrigger(
            canvas_id="c", recipients=[pb.Recipient(external_user_id=f"u{i}") for i in range(150)]
        )
    )
    in_flight = asyncio.ensure_future(harness.stub.Send(request, metadata=harness.auth()))
    # the first call is answered and the second is at the fake Braze (the third waits for it)
    await until(lambda: len(harness.fake.calls) == 1 and harness.fake.in_progress == 1)
    began = time.monotonic()
    await harness.gateway.stop(grace=0.5)
    reply = await in_flight
    assert time.monotonic() - began < 4  # did not wait for the hung call

    outcomes = [(r.outcome, r.positions[0], r.retryable) for r in reply.results]
    assert outcomes == [
        (pb.OUTCOME_SENT, 0, False),
        (pb.OUTCOME_UNKNOWN, 50, False),  # its call was under way: it may have reached Braze
        (pb.OUTCOME_NOT_ATTEMPTED, 100, True),  # never sent: safe to send again
    ]
    assert sorted(p for r in reply.results for p in r.positions) == list(range(150))
    assert "shut down" in reply.results[1].status_message


async def test_an_abandoned_stream_batch_is_reported_not_dropped(harness: Harness) -> None:
    harness.fake.faults.script([Fault.delay(0), Fault.delay(5.0)])

    async def requests() -> AsyncIterator[pb.SendStreamRequest]:
        yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c")))
        recipients = [pb.Recipient(external_user_id=f"u{i}") for i in range(100)]
        yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients))

    responses: list[pb.SendStreamResponse] = []

    async def read() -> None:
        async for response in harness.stub.SendStream(requests(), metadata=harness.auth()):
            responses.append(response)

    reading = asyncio.create_task(read())
    # one call is answered and the other, its batch's only chance, is at the fake Braze
    await until(lambda: len(harness.fake.calls) == 1 and harness.fake.in_progress == 1)
    await harness.gateway.stop(grace=0.5)
    await reading  # the caller had sent everything: the stream ends normally, with its summary
    results = [r.result for r in responses if r.HasField("result")]
    assert sorted(p for r in results for p in r.positions) == list(range(100))
    assert sorted(r.outcome for r in results) == [pb.OUTCOME_SENT, pb.OUTCOME_UNKNOWN]
    assert responses[-1].summary.recipients_unknown == 50


@pytest.mark.parametrize("settings_overrides", [{"upstream_pool_size": 1, "request_concurrency": 4}])
async def test_batches_still_waiting_for_a_connection_are_known_unsent(harness: Harness) -> None:
    harness.fake.faults.script([Fault.delay(5.0)])  # holds the only pooled connection
    recipients = [pb.Recipient(external_user_id=f"u{i}") for i in range(200)]
    request = pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", recipients=recipients))
    in_flight = asyncio.ensure_future(harness.stub.Send(request, metadata=harness.auth()))
    # one call is on the wire, the three other batches are under way too: waiting for the pool
    await until(lambda: harness.fake.in_progress == 1 and batches_in_flight(harness) == 4)
    await harness.gateway.stop(grace=0.3)
    reply = await in_flight
    outcomes = sorted(r.outcome for r in reply.results)
    assert outcomes == [pb.OUTCOME_UNKNOWN] + [pb.OUTCOME_NOT_ATTEMPTED] * 3
    assert all(r.retryable for r in reply.results if r.outcome == pb.OUTCOME_NOT_ATTEMPTED)


async def test_a_port_in_use_is_a_clear_boot_error(harness: Harness, tmp_path: Path) -> None:
    taken = harness.target  # the harness gateway holds it
    keys = str(tmp_path / "keys.sqlite3")  # a fixed port keeps keys in a file: not the host's /tmp
    settings = Settings.from_env(
        {}, demo=True, demo_braze_port=0, grpc_address=taken, idempotency_file=keys, **LOCAL
    )
    with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1:\d+: the address is in use"):
        await Gateway.start(settings)
    fake_port = int(FAKE_URLS[id(harness.fake)].rsplit(":", 1)[1])
    settings = Settings.from_env(
        {}, demo=True, demo_braze_port=fake_port, grpc_address="127.0.0.1:0", **LOCAL
    )
    with pytest.raises(ConfigError, match="cannot start the demo fake Braze"):
        await Gateway.start(settings)
