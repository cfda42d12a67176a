"""Connections age out, so clients behind a balancer spread over new replicas; calls under way
finish first, however long a bulk stream takes. Dead, stalled and abusive connections are
dropped or bounded: a frozen peer after keepalive and its timeout, a stalled handshake, call or
idle connection after their timeouts, rapid reset past the streams a connection may hold."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_server import logs
from canvas_gateway_server.edge.servicer import SERVICE_NAME
from canvas_gateway_server.errors import ConfigError
from canvas_gateway_server.settings import Grpc, Settings, Tenants
from fake_braze import FakeBraze
from h2wire import PING, REFUSED_STREAM, RawConnection
from support import FAKE_URLS, KEYS, TOKENS, Harness, free_port, tenants_toml, until

SEND = f"/{SERVICE_NAME}/Send"

AGE = {"max_connection_age_seconds": 0.5}
REQUEST = pb.SendRequest(
    trigger=pb.CanvasTrigger(canvas_id="c", recipients=[pb.Recipient(external_user_id="u")])
)


def _peers(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.peer for r in caplog.records if r.name == "canvas_gateway_server.access"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("settings_overrides", [AGE])
async def test_an_old_connection_is_replaced(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="canvas_gateway_server.access")
    await harness.stub.Send(REQUEST, metadata=harness.auth())
    await harness.stub.Send(REQUEST, metadata=harness.auth())
    await asyncio.sleep(1.5)  # past the age (+/-10% jitter): the server sent GOAWAY
    await harness.stub.Send(REQUEST, metadata=harness.auth())
    first, second, third = _peers(caplog)
    assert first == second != third  # the same client port until the age, a new connection after


@pytest.mark.parametrize("settings_overrides", [AGE])
async def test_a_stream_outlives_its_connection_s_age(harness: Harness) -> None:
    harness.fake.faults.set_latency(0.3)

    async def messages() -> AsyncIterator[pb.SendStreamRequest]:
        yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c")))
        for chunk in range(4):
            await asyncio.sleep(0.3)
            recipients = [pb.Recipient(external_user_id=f"u{chunk}-{i}") for i in range(100)]
            yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients))

    responses = [r async for r in harness.stub.SendStream(messages(), metadata=harness.auth(), timeout=30)]
    assert responses[-1].summary.recipients_sent == 400  # about 2 s: four times the age


def test_keepalive_and_age_reach_the_server_s_options() -> None:
    options = dict(
        Grpc(max_connection_age_seconds=90, max_connection_age_grace_seconds=5).options(
            connections=None, reuse_port=False
        )
    )
    assert options["grpc.max_connection_age_ms"] == 90_000
    assert options["grpc.max_connection_age_grace_ms"] == 5_000
    assert options["grpc.keepalive_time_ms"] == 60_000
    # gRPC core waits ping_timeout_ms (60 s by default) for a ping's answer, whatever keepalive says.
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 20_000
    assert options["grpc.server_handshake_timeout_ms"] == 10_000
    assert options["grpc.max_connection_idle_ms"] == 60_000
    assert options["grpc.max_concurrent_streams"] == 100
    assert options["grpc.so_reuseport"] == 0  # a second gateway on the port fails, unless a worker
    assert dict(Grpc().options(connections=None, reuse_port=True))["grpc.so_reuseport"] == 1
    unlimited = dict(
        Grpc(max_connection_age_seconds=0, max_connection_idle_seconds=0).options(
            connections=None, reuse_port=False
        )
    )
    assert not {
        "grpc.max_connection_age_ms",
        "grpc.max_connection_age_grace_ms",
        "grpc.max_connection_idle_ms",
        "grpc.max_allowed_incoming_connections",  # no open-file limit given: none derived
    } & set(unlimited)


def test_the_connection_cap_leaves_files_for_braze_and_the_gateway() -> None:
    settings = Settings(tenants=Tenants(demo=True))
    assert settings.connection_cap(1024) == 796
    assert settings.connection_cap(None) is None
    options = dict(settings.grpc.options(connections=796, reuse_port=False))
    assert options["grpc.max_allowed_incoming_connections"] == 796
    assert Settings(grpc=Grpc(max_connections=50), tenants=Tenants(demo=True)).connection_cap(1024) == 50
    with pytest.raises(ConfigError, match=r"limit \(200\) leaves no connections.*CGW_MAX_CONNECTIONS"):
        settings.connection_cap(200)


KEEPALIVE = {"keepalive_time_seconds": 1.0, "keepalive_timeout_seconds": 0.5}


@pytest.mark.parametrize("settings_overrides", [KEEPALIVE])
async def test_a_frozen_peer_is_dropped_after_keepalive_and_its_timeout(harness: Harness) -> None:
    # A peer that has stopped answering (frozen, or a path that drops packets) answers no ping.
    # gRPC core used to wait 60 s for the answer whatever the keepalive timeout: 61.5 s here.
    peer = await RawConnection.open(harness.gateway.port, answer_pings=False)
    try:
        lasted = await peer.closed(within=15)
    finally:
        await peer.close()
    assert peer.seen.frames[PING] >= 1
    assert lasted is not None and 1.0 <= lasted < 1.5 + 2.0  # keepalive + timeout, and scheduling noise


STALLS = {
    # TCP open, no HTTP/2 preface: the handshake timeout alone ends it (no idle timeout here).
    "mid-handshake": {"handshake_timeout_seconds": 0.5, "max_connection_idle_seconds": 0},
    # HTTP/2 up, no call.
    "idle": {"max_connection_idle_seconds": 0.5},
    # A call whose request message never comes: it ends, then the connection is idle.
    "mid-request": {"request_message_timeout_seconds": 0.5, "max_connection_idle_seconds": 0.5},
}


@pytest.mark.parametrize(("stall", "settings_overrides"), STALLS.items(), ids=STALLS.keys())
async def test_a_connection_that_stalls_is_closed(harness: Harness, stall: str) -> None:
    connection = await RawConnection.open(harness.gateway.port, handshake=stall != "mid-handshake")
    if stall == "mid-request":
        connection.start_call(SEND, TOKENS["acme"])
        await connection.flush()
    try:
        lasted = await connection.closed(within=10)
    finally:
        await connection.close()
    assert lasted is not None and lasted < 5
    if stall == "idle":
        assert connection.seen.goaway is not None  # told to go, not just cut


@pytest.mark.parametrize("settings_overrides", [{"max_streams_per_connection": 100}])
async def test_rapid_reset_is_refused_and_another_tenant_is_unaffected(harness: Harness) -> None:
    """20,000 streams opened and reset at once on one connection used to start about 12,000
    handlers and CANCEL another tenant's calls; past the per-connection cap, streams are refused."""
    streams = 5_000
    request = pb.SendRequest(
        trigger=pb.CanvasTrigger(canvas_id="c", recipients=[pb.Recipient(external_user_id="u")]),
        options=pb.SendOptions(validate_only=True),
    ).SerializeToString()
    attacker = await RawConnection.open(harness.gateway.port)
    attacking = True
    latencies: list[float] = []

    async def another_tenant() -> None:
        while attacking:
            began = time.monotonic()
            reply = await harness.stub.Send(REQUEST, metadata=harness.auth("globex"), timeout=10)
            latencies.append(time.monotonic() - began)
            assert reply.summary.recipients_sent == 1
            await asyncio.sleep(0.01)

    victim = asyncio.create_task(another_tenant())
    try:
        await until(lambda: bool(latencies))  # the other tenant is being served
        for chunk in range(0, streams, 100):
            for index in range(chunk, chunk + 100):
                attacker.start_call(SEND, TOKENS["acme"] if index % 2 else "", request, reset=True)
            await attacker.flush()
        await asyncio.sleep(1.0)  # the server answers the last of them
    finally:
        attacking = False
        await victim  # raises if any of its calls failed (CANCELLED, as before)
        await attacker.close()
    refused = attacker.seen.resets[REFUSED_STREAM]
    labels = {"grpc_type": "unary", "grpc_service": SERVICE_NAME, "grpc_method": "Send"}
    started = harness.gateway.registry.get_sample_value("grpc_server_started_total", labels)
    assert started is not None
    assert refused >= streams * 0.9, refused
    assert started - len(latencies) <= streams * 0.1  # handlers the attack started (101 measured)
    assert len(latencies) >= 10 and max(latencies) < 2.0


@asynccontextmanager
async def gateway_process(
    fake: FakeBraze, tmp_path: Path, open_files: int, settings: dict[str, str]
) -> AsyncIterator[tuple[str, str, Path]]:
    """The real entrypoint, one process, at an open-file limit of `open_files`: its gRPC and admin
    addresses, and the file its log goes to (a pipe nobody read would block a flood)."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    address, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "CGW_TENANTS_FILE": str(tenants),
        "CGW_GRPC_ADDRESS": address,
        "CGW_ADMIN_ADDRESS": admin,
        "CGW_WORKERS": "1",
        "CGW_SHUTDOWN_DELAY_SECONDS": "0",
        "ACME_BRAZE_KEY": KEYS["acme"],
        **{f"CGW_{name.upper()}": value for name, value in settings.items()},
    }
    limit = (
        f"import resource, runpy; resource.setrlimit(resource.RLIMIT_NOFILE, ({open_files}, {open_files})); "
        "runpy.run_module('canvas_gateway_server', run_name='__main__')"
    )
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", limit, env=env, stderr=out)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), 20)
        yield address, admin, log
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def healthz(admin: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{admin}/healthz", timeout=aiohttp.ClientTimeout(total=3)) as reply,
    ):
        return reply.status


async def stall(port: int, count: int) -> list[RawConnection]:
    """`count` connections stalled mid-handshake, idle, or mid-request, in turn."""
    stalled = []
    for index in range(count):
        connection = await RawConnection.open(port, handshake=index % 3 != 0)
        stalled.append(connection)
        if index % 3 == 2:
            connection.start_call(SEND, TOKENS["acme"])
            with contextlib.suppress(ConnectionError):  # past the cap, the server has closed it
                await connection.flush()
    return stalled


async def test_stalled_connections_at_the_open_file_limit_leave_new_callers_served(
    fake: FakeBraze, tmp_path: Path
) -> None:
    """At 400 open files, 200 stalled sockets: the port takes 172 (400 less 100 for Braze and
    128 kept), closes the rest on arrival, and drops the stalled ones after their timeouts."""
    short = {
        "handshake_timeout_seconds": "1",
        "max_connection_idle_seconds": "1",
        "request_message_timeout_seconds": "1",
    }
    async with gateway_process(fake, tmp_path, 400, short) as (address, admin, log):
        stalled = await stall(int(address.rpartition(":")[2]), 200)
        try:
            began = time.monotonic()
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.CanvasGatewayServiceStub(channel)
                reply = await stub.Send(REQUEST, metadata=Harness.auth(), timeout=15, wait_for_ready=True)
            served = time.monotonic() - began
            assert reply.summary.recipients_sent == 1
            assert await healthz(admin) == 200
            closed = await asyncio.gather(*(c.closed(within=10) for c in stalled))
        finally:
            for connection in stalled:
                await connection.close()
        assert served < 10
        assert all(seconds is not None for seconds in closed)
        assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("cap", ["0", "1000"], ids=["derived cap", "cap past the file limit"])
async def test_a_full_grpc_port_leaves_files_for_the_admin_port_or_one_log_line(
    fake: FakeBraze, tmp_path: Path, cap: str
) -> None:
    """300 sockets held open (long timeouts) at 300 open files. With the derived cap (72 here)
    /healthz is still answered. With a cap past the limit the process runs out of files: the
    admin listener's accept errors, which asyncio logged as thousands of tracebacks a second,
    make one throttled line."""
    held = {"handshake_timeout_seconds": "60", "max_connections": cap}
    async with gateway_process(fake, tmp_path, 300, held) as (address, admin, log):
        port = int(address.rpartition(":")[2])
        stalled = [await RawConnection.open(port, handshake=False) for _ in range(300)]
        try:
            await asyncio.sleep(0.5)  # the server has accepted what it will
            if cap == "0":
                assert await healthz(admin) == 200
            else:
                with pytest.raises((aiohttp.ClientError, TimeoutError)):
                    await healthz(admin)
        finally:
            for connection in stalled:
                await connection.close()
        text = log.read_text()
        assert "Traceback" not in text and "socket.accept() out of system resource" not in text
        if cap != "0":
            assert 1 <= text.count("out of open files") <= 2


def test_out_of_files_on_accept_is_one_throttled_line(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        logs.throttle_accept_errors(loop)
        for _ in range(1000):  # what one second of CPython's accept retries looked like
            loop.call_exception_handler({"message": logs.OUT_OF_FILES, "exception": OSError(24, "EMFILE")})
        loop.call_exception_handler({"message": "something else"})
    finally:
        loop.close()
    ours = [r for r in caplog.records if r.name == "canvas_gateway_server.connections"]
    assert [(r.levelname, r.exc_info) for r in ours] == [("WARNING", None)]
    assert "out of open files" in ours[0].getMessage()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == ["something else"]
