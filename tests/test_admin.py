"""The admin listener over real HTTP: /metrics in both formats, /healthz, /readyz, and the order
of a shutdown as a balancer sees it."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import statistics
import sys
import time
from asyncio.constants import ACCEPT_RETRY_DELAY
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_server.admin import BACKLOG, MAX_CONNECTIONS, PACING, AdminServer, registry_exposition
from canvas_gateway_server.app import Gateway
from canvas_gateway_server.errors import ConfigError
from canvas_gateway_server.settings import Settings
from fake_braze import FakeBraze, Fault
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry
from servers import stop_process
from support import (
    FAKE_URLS,
    LOCAL,
    Harness,
    free_port,
    gateway_env,
    health_watch,
    learn_budget,
    tenants_toml,
    until,
)

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
    await learn_budget(harness)  # else the call below waits for the one in flight (cold start)
    watch = health_watch(harness)
    assert (await anext(watch)).status == health_pb2.HealthCheckResponse.SERVING

    harness.fake.faults.script([Fault.delay(3.0)])  # this call, in flight, keeps the server draining
    in_flight = asyncio.ensure_future(harness.stub.Send(REQUEST, metadata=harness.auth(), timeout=10))
    await until(lambda: harness.fake.in_progress >= 1)
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


# --- hostile edges (issue 17): stalled connections, descriptors, a scrape flood -----------


async def _ready() -> str | None:
    return None


async def _connect(port: int, request: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    return reader, writer


def _closed(reader: asyncio.StreamReader) -> bool:
    """Closed by the server: an end of file, or a reset (closed before it read what we sent)."""
    return reader.at_eof() or reader.exception() is not None


STALLED = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
"""A request whose headers never end."""


async def test_a_connection_that_never_sends_a_whole_request_is_closed() -> None:
    admin = AdminServer(registry_exposition(CollectorRegistry()), _ready, idle_seconds=0.3)
    port = await admin.start("127.0.0.1", 0)
    try:
        silent, stalled = await _connect(port), await _connect(port, STALLED)
        served = await _connect(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await served[0].readuntil(b"ok\n")).startswith(b"HTTP/1.1 200")
        for reader, writer in (silent, stalled, served):  # served: idle after its answer
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
    finally:
        await admin.stop()


async def test_the_oldest_connections_make_way_and_probes_are_answered() -> None:
    admin = AdminServer(registry_exposition(CollectorRegistry()), _ready, max_connections=8)
    port = await admin.start("127.0.0.1", 0)
    try:
        clients = [await _connect(port, STALLED) for _ in range(40)]
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(f"http://127.0.0.1:{port}/healthz") as reply:
                    assert reply.status == 200
        deadline = time.monotonic() + 5
        while sum(not _closed(reader) for reader, _ in clients) > 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        still_open = [index for index, (reader, _) in enumerate(clients) if not _closed(reader)]
        assert len(still_open) <= 8 and still_open == list(range(40 - len(still_open), 40))
        for _, writer in clients:
            writer.close()
    finally:
        await admin.stop()


@asynccontextmanager
async def _gateway(fake: FakeBraze, tmp_path: Path) -> AsyncIterator[tuple[int, str, str, Path]]:
    """A gateway process (one worker) once /readyz answers: its pid, gRPC and admin addresses, log."""
    tenants, log = tmp_path / "tenants.toml", tmp_path / "gateway.log"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    address, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = gateway_env(tenants, address, admin)
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "canvas_gateway_server", env=env, stderr=output
        )
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 20
            while (await _status(session, f"http://{admin}/readyz", 1)) != 200:
                assert process.returncode is None and time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.05)
        yield process.pid, address, admin, log
    finally:
        await stop_process(process)


async def _status(session: aiohttp.ClientSession, url: str, within: float) -> int:
    """The status of a GET, or 0 when there is none `within` seconds."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=within)) as reply:
            return reply.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_probes_are_answered_and_errors_stay_quiet_at_a_tight_descriptor_limit(
    fake: FakeBraze, tmp_path: Path
) -> None:
    async with _gateway(fake, tmp_path) as (pid, _, admin, log), aiohttp.ClientSession() as session:
        port = int(admin.rsplit(":", 1)[1])
        hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
        # Room for the admin port's connections and a few more: stalled ones cannot take it all.
        room = MAX_CONNECTIONS + 2 * BACKLOG
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (_descriptors(pid) + room, hard))
        stalled: list[Any] = []
        more: list[Any] = []
        try:
            stalled += [await _connect(port, STALLED) for _ in range(150)]
            for _ in range(3):
                assert await _status(session, f"http://{admin}/healthz", 5) == 200, log.read_text()[-3000:]
            # Fewer descriptors than the admin port may use: accepting fails, and says so once. More
            # connections until it does: the stalled ones may be closing by now (their idle timeout,
            # 10 s, can pass on a loaded machine), which frees descriptors under the new limit.
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (_descriptors(pid) - 8, hard))
            deadline = time.monotonic() + 10
            while "admin port: cannot accept connections" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                more += await asyncio.gather(
                    *(asyncio.wait_for(_connect(port, STALLED), 1) for _ in range(24)), return_exceptions=True
                )
                await asyncio.sleep(0.05)
            await asyncio.sleep(2.5 * ACCEPT_RETRY_DELAY)  # asyncio retries accepting once a second
            text = log.read_text()
            assert text.count("cannot accept connections (Too many open files)") == 1, text
            assert "ERROR" not in text and "Traceback" not in text, text
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
            for client in (*stalled, *more):
                if not isinstance(client, BaseException):
                    client[1].close()
        deadline = time.monotonic() + 10
        while await _status(session, f"http://{admin}/healthz", 1) != 200:
            assert time.monotonic() < deadline


FLOOD = Path(__file__).with_name("scrape_flood.py")
FLOOD_THREADS = 8
PHASE_SECONDS = 0.75


async def _p50_ms(stub: pb_grpc.CanvasGatewayServiceAsyncStub, seconds: float) -> float:
    """The median time of globex's unary Sends, one after another for `seconds`."""
    times: list[float] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until or len(times) < 10:
        start = time.perf_counter()
        await stub.Send(REQUEST, metadata=Harness.auth("globex"), timeout=10)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def test_a_flood_of_scrapes_barely_slows_another_tenant_s_calls(
    fake: FakeBraze, tmp_path: Path
) -> None:
    async with (
        _gateway(fake, tmp_path) as (_, address, admin, _),
        grpc.aio.insecure_channel(address) as channel,
    ):
        stub = pb_grpc.CanvasGatewayServiceStub(channel)
        await _p50_ms(stub, 0.2)  # warm up
        quiet, flooded, scrapes = [], [], 0
        for _ in range(3):  # alternated, so that the box's own noise falls on both
            quiet.append(await _p50_ms(stub, PHASE_SECONDS))
            flood = await asyncio.create_subprocess_exec(
                sys.executable, str(FLOOD), admin, str(FLOOD_THREADS), stdin=PIPE, stdout=PIPE
            )
            assert flood.stdout is not None
            assert await flood.stdout.readline() == b"started\n"
            flooded.append(await _p50_ms(stub, PHASE_SECONDS))
            answered, _ = await flood.communicate(b"")
            scrapes += int(answered)
    ratio = statistics.median(flooded) / statistics.median(quiet)
    measured = f"unary p50 {quiet} ms quiet, {flooded} ms flooded (x{ratio:.2f}); {scrapes} scrapes"
    assert scrapes >= 50 * 3 * PHASE_SECONDS, measured  # a flood it was, and scrapes were answered
    assert ratio < 3, measured  # before issue 17: x27 (37-105 ms against 1.4-5.7 ms)


async def test_scrapes_together_share_one_fresh_exposition_and_the_next_waits_its_turn() -> None:
    loop = asyncio.get_running_loop()
    state, produced = [0], list[tuple[float, float]]()

    async def expose(_: str) -> tuple[bytes, str]:
        start = loop.time()
        await asyncio.sleep(0.02)
        produced.append((start, loop.time()))
        return str(state[0]).encode(), "text/plain"

    admin = AdminServer(expose, _ready)
    port = await admin.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:

            async def scrape() -> str:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as reply:
                    return await reply.text()

            assert await asyncio.gather(*(scrape() for _ in range(10))) == ["0"] * 10
            state[0] = 1  # done before the next scrape asks: it must show
            assert await scrape() == "1"
    finally:
        await admin.stop()
    assert len(produced) <= 3  # 11 scrapes; the first may start alone, the rest share
    (_, first_end), (second_start, _) = produced[-2:]
    assert second_start - first_end >= PACING * 0.02


async def test_a_slow_readiness_check_does_not_hold_up_liveness() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_readiness() -> str | None:
        entered.set()
        await release.wait()
        return None

    admin = AdminServer(registry_exposition(CollectorRegistry()), slow_readiness)
    port = await admin.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            readyz = asyncio.ensure_future(_status(session, f"http://127.0.0.1:{port}/readyz", 10))
            await asyncio.wait_for(entered.wait(), 5)
            assert await _status(session, f"http://127.0.0.1:{port}/healthz", 5) == 200
            assert not readyz.done()
            release.set()
            assert await readyz == 200
    finally:
        await admin.stop()
