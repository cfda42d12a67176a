"""The real entrypoint as a process: boot from env, SIGHUP reload, SIGTERM drain and exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_server.tenants import token_digest
from fake_braze import FakeBraze
from support import (
    FAKE_URLS,
    KEYS,
    SECRET_PIECES,
    TOKENS,
    UNESCAPED_PASSWORDS,
    free_port,
    gateway_env,
    tenants_toml,
)

Running = tuple[asyncio.subprocess.Process, str, Path]
REQUEST = pb.SendRequest(
    trigger=pb.CanvasTrigger(
        canvas_id="c", recipients=[pb.Recipient(external_user_id=f"u{i}") for i in range(3)]
    )
)


@pytest.fixture
async def process(
    fake: FakeBraze, tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, Path]]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "CGW_TENANTS_FILE": str(tenants),
        "CGW_GRPC_ADDRESS": address,
        "CGW_SHUTDOWN_GRACE_SECONDS": "5",
        "CGW_SHUTDOWN_DELAY_SECONDS": "0",
        "CGW_ADMIN_ADDRESS": "127.0.0.1:0",
        "CGW_IDEMPOTENCY_FILE": str(tmp_path / "keys.sqlite3"),  # not the host's default in /tmp
        "ACME_BRAZE_KEY": KEYS["acme"],
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "canvas_gateway_server", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        yield proc, address, tenants
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def send(address: str, token: str) -> pb.SendResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 20)
        stub = pb_grpc.CanvasGatewayServiceStub(channel)
        reply: pb.SendResponse = await stub.Send(
            REQUEST, metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
        return reply


async def test_sighup_reloads_and_sigterm_drains_and_exits_cleanly(process: Running, fake: FakeBraze) -> None:
    proc, address, tenants = process
    assert (await send(address, TOKENS["acme"])).summary.recipients_sent == 3

    tenants.write_text(
        tenants_toml(FAKE_URLS[id(fake)]).replace(token_digest(TOKENS["acme"]), token_digest("new-token"))
    )
    proc.send_signal(signal.SIGHUP)
    codes = []
    for _ in range(100):  # the reload is asynchronous to us: poll until the new token works
        try:
            await send(address, "new-token")
            break
        except grpc.aio.AioRpcError as error:
            codes.append(error.code())
            await asyncio.sleep(0.05)
    else:
        pytest.fail("SIGHUP did not reload the tenants file")
    assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED}

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert proc.stderr is not None
    log = (await proc.stderr.read()).decode()
    assert "tenants reloaded" in log and "canvas-gateway stopped" in log
    for secret in (*KEYS.values(), *TOKENS.values(), "new-token"):
        assert secret not in log


async def test_a_bad_environment_stops_the_process_with_a_clear_message(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "canvas_gateway_server",
        env={
            **os.environ,
            "CGW_TENANTS_FILE": str(tmp_path / "missing.toml"),
            "CGW_GRPC_ADDRESS": "127.0.0.1:0",
        },
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert b"cannot read tenants file" in err


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_redis_url_that_would_not_parse_stops_the_boot_without_quoting_it(
    tmp_path: Path, fake: FakeBraze, workers: str
) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    base = {key: value for key, value in os.environ.items() if not key.startswith("CGW_")}

    async def boot(url: str) -> tuple[int | None, str]:
        env = {
            **base,
            "CGW_WORKERS": workers,
            "CGW_TENANTS_FILE": str(tenants),
            "CGW_GRPC_ADDRESS": "127.0.0.1:0",
            "CGW_ADMIN_ADDRESS": "127.0.0.1:0",
            "CGW_REDIS_URL": url,
            "ACME_BRAZE_KEY": KEYS["acme"],
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "canvas_gateway_server", env=env, stdout=PIPE, stderr=PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode, (out + err).decode()

    urls = [*UNESCAPED_PASSWORDS, "redis://:Qz9Xv7k@127.0.0.1:6379/0?socket_timeout=Jw3"]
    for code, output in await asyncio.gather(*(boot(url) for url in urls)):
        assert code == 1, output  # the status of every configuration error
        assert output.startswith("canvas-gateway: CGW_REDIS_URL "), output
        assert "Traceback" not in output and not any(piece in output for piece in SECRET_PIECES), output


def _catches_sighup(pid: int) -> bool:
    """Whether the process has a handler for SIGHUP (or ignores it): its default action is gone."""
    status = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line
    )
    return bool((int(status["SigCgt"], 16) | int(status["SigIgn"], 16)) & 1 << (signal.SIGHUP - 1))


def _accepts(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sighup_again_and_again_during_start_up_neither_kills_nor_is_lost(
    tmp_path: Path, fake: FakeBraze, workers: str
) -> None:
    tenants, log = tmp_path / "tenants.toml", tmp_path / "gateway.log"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    address, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = gateway_env(tenants, address, admin, CGW_WORKERS=workers)
    with log.open("wb") as output:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "canvas_gateway_server", env=env, stderr=output
        )
    try:
        # Python's own start (tens of ms, before any of our code) keeps SIGHUP's default action;
        # main's first line catches it, long before the gRPC port is bound.
        deadline = time.monotonic() + 10
        while not _catches_sighup(proc.pid):
            assert proc.returncode is None and time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.001)
        assert not _accepts(address)
        sent = 0
        async with aiohttp.ClientSession() as session:
            while not await _ready(session, admin):
                assert proc.returncode is None and time.monotonic() < deadline + 20, log.read_text()
                proc.send_signal(signal.SIGHUP)
                sent += 1
                await asyncio.sleep(0.02)
        assert sent >= 10  # the start-up was hit all along
        for _ in range(5):  # and then while it serves
            proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.02)
        assert (await send(address, TOKENS["acme"])).summary.recipients_sent == 3
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log.read_text()
    assert "Traceback" not in text
    assert "SIGHUP during start-up" in text
    assert text.count("tenants reloaded") >= int(workers), text


async def _ready(session: aiohttp.ClientSession, admin: str) -> bool:
    try:
        async with session.get(f"http://{admin}/readyz") as reply:
            return reply.status == 200
    except aiohttp.ClientError:
        return False
