"""The real entrypoint as a process: boot from env, SIGHUP reload, SIGTERM drain and exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_server.tenants import token_digest
from conftest import FAKE_URLS, KEYS, TOKENS, free_port, tenants_toml
from fake_braze import FakeBraze

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
