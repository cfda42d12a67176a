"""The admin listener over real HTTP: /metrics in both formats, /healthz, /readyz, and the order
of a shutdown as a balancer sees it."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server.app import Gateway
from canvas_gateway_server.errors import ConfigError
from canvas_gateway_server.settings import Settings
from conftest import LOCAL, Harness, health_watch
from fake_braze import Fault
from grpc_health.v1 import health_pb2

REQUEST = pb.SendRequest(
    trigger=pb.CanvasTrigger(canvas_id="c", recipients=[pb.Recipient(external_user_id="u1")])
)


async def get(h: Harness, path: str, **headers: str) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{h.gateway.admin_port}{path}", headers=headers) as reply,
    ):
        return reply.status, reply.headers.get("Content-Type", ""), await reply.text()


async def test_metrics_in_the_text_format_and_in_openmetrics_when_asked(harness: Harness) -> None:
    await harness.stub.Send(REQUEST, metadata=harness.auth())
    status, content_type, text = await get(harness, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert 'canvas_gateway_recipients_total{outcome="sent",tenant="acme"} 1.0' in text
    status, content_type, text = await get(
        harness, "/metrics", Accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    assert 'canvas_gateway_recipients_total{outcome="sent",tenant="acme"} 1.0' in text


async def test_liveness_and_readiness(harness: Harness) -> None:
    assert (await get(harness, "/healthz"))[0::2] == (200, "ok\n")
    assert (await get(harness, "/readyz"))[0::2] == (200, "ready\n")
    assert (await get(harness, "/nothing"))[0] == 404


@pytest.mark.parametrize("settings_overrides", [{"shutdown_delay_seconds": 0.6}])
async def test_shutdown_turns_not_ready_first_and_refuses_new_work_only_after_the_delay(
    harness: Harness,
) -> None:
    watch = health_watch(harness)
    assert (await anext(watch)).status == health_pb2.HealthCheckResponse.SERVING

    harness.fake.faults.script([Fault.delay(3.0)])  # this call, in flight, keeps the server draining
    in_flight = asyncio.ensure_future(harness.stub.Send(REQUEST, metadata=harness.auth(), timeout=10))
    while harness.fake.in_progress < 1:
        await asyncio.sleep(0.01)
    stopping = asyncio.create_task(harness.gateway.stop(grace=5))
    update = await asyncio.wait_for(anext(watch), 5)
    assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
    status, _, text = await get(harness, "/readyz")  # at the same moment as gRPC health
    assert (status, text) == (503, "not ready: draining: the gateway is shutting down\n")
    assert harness.gateway.registry.get_sample_value("canvas_gateway_ready") == 0
    # during the delay the gateway still serves, so callers routed here before balancers notice lose nothing
    reply = await harness.stub.Send(REQUEST, metadata=harness.auth(), timeout=5)
    assert reply.summary.recipients_sent == 1
    await asyncio.wait_for(asyncio.shield(harness.gateway.shutting_down.wait()), 5)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.stub.Send(REQUEST, metadata=harness.auth(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await in_flight).summary.recipients_sent == 1
    await stopping


async def test_an_admin_port_in_use_is_a_clear_boot_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings.from_env(
            {},
            **{**LOCAL, "admin_address": f"127.0.0.1:{port}"},
            demo=True,
            demo_braze_port=0,
            grpc_address="127.0.0.1:0",
        )
        with pytest.raises(ConfigError, match="CGW_ADMIN_ADDRESS"):
            await Gateway.start(settings)
