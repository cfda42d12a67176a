"""The Python client resumes a stream that a draining gateway ends, across a real restart of
the gateway on the same port: every position gets exactly one result and no one is messaged
twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_client import CanvasGatewayClient, Waiting, resume_position
from canvas_gateway_server.app import Gateway
from canvas_gateway_server.settings import Settings
from fake_braze import FakeBraze
from support import FAKE_URLS, LOCAL, TOKENS, free_port, start_gateway, tenants_toml, until

COUNT = 4_000


def _settings(fake: FakeBraze, tmp_path: Path) -> Settings:
    """A gateway on a port of its own, fixed so that a restart takes the same one; the fake slowed
    down so that a drain falls mid-stream."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    fake.faults.set_latency(0.02)
    return Settings.from_env(
        {},
        grpc_address=f"127.0.0.1:{free_port()}",
        tenants_file=str(tenants),
        idempotency_file=str(tmp_path / "keys.sqlite3"),  # not the host's default, kept in /tmp
        **LOCAL,
    )


async def _recipients() -> AsyncIterator[dict[str, Any]]:
    for i in range(COUNT):
        if i % 200 == 0:
            await asyncio.sleep(0.02)  # a source that takes its time, so the restart falls mid-stream
        yield {"external_user_id": f"u{i}", "context": {"n": i}}


async def test_a_stream_resumes_across_a_gateway_restart(fake: FakeBraze, tmp_path: Path) -> None:
    settings = _settings(fake, tmp_path)
    first = await start_gateway(settings)
    results: list[pb.BatchResult] = []
    summaries: list[pb.SendSummary] = []
    waits: list[Waiting] = []
    second: Gateway | None = None
    async with CanvasGatewayClient(settings.listen.grpc_address, TOKENS["acme"]) as client:

        async def consume() -> None:
            async for response in client.send_stream(
                {"canvas_id": "c"}, _recipients(), chunk_size=100, resumes=5, on_wait=waits.append
            ):
                if response.HasField("result"):
                    results.append(response.result)
                else:
                    summaries.append(response.summary)

        consuming = asyncio.create_task(consume())
        try:
            await until(lambda: len(fake.calls) >= 10)
            await first.stop(grace=5)  # drains: the stream ends UNAVAILABLE with where to resume
            before_restart = len(fake.calls)
            second = await start_gateway(settings)  # the same port, a new process state
            async with asyncio.timeout(60):
                await consuming
        finally:
            consuming.cancel()
            if second is not None:
                await second.stop(grace=0)

    assert before_restart < COUNT // 50  # the first gateway sent only part: the rest needed a resume
    positions = Counter(p for r in results for p in r.positions)
    assert sorted(positions) == list(range(COUNT)) and set(positions.values()) == {1}
    assert {r.outcome for r in results} == {pb.OUTCOME_SENT}
    assert len({r.batch_index for r in results}) == len(results)  # indexes stay unique
    received = Counter(r["external_user_id"] for call in fake.calls for r in call.body["recipients"])
    assert received == Counter(f"u{i}" for i in range(COUNT))  # each exactly once: none twice
    for result in results:  # the caller's numbering: position i is u<i>, whichever stream sent it
        call = next(c for c in fake.calls if c.dispatch_id == result.braze.dispatch_id)
        assert [r["context"]["n"] for r in call.body["recipients"]] == list(result.positions)
    (wait,) = waits  # the caller was told what the send waited for, and for how long
    assert (wait.cause, wait.resume, wait.limit, wait.pause, wait.wait) == ("draining", 1, 5, 0.25, 60.0)
    assert wait.detail.startswith("UNAVAILABLE: ") and not wait.gave_up
    (summary,) = summaries
    assert (summary.recipients, summary.recipients_sent, summary.batches) == (COUNT, COUNT, len(results))


async def test_without_resumes_the_drain_is_the_caller_s_to_handle(fake: FakeBraze, tmp_path: Path) -> None:
    settings = _settings(fake, tmp_path)
    gateway = await start_gateway(settings)
    results: list[pb.BatchResult] = []
    async with CanvasGatewayClient(settings.listen.grpc_address, TOKENS["acme"]) as client:

        async def consume() -> None:
            async for response in client.send_stream({"canvas_id": "c"}, _recipients(), chunk_size=100):
                results.append(response.result)

        consuming = asyncio.create_task(consume())
        await until(lambda: len(fake.calls) >= 10)
        await gateway.stop(grace=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await consuming
    position = resume_position(caught.value)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and position is not None
    covered = sorted(p for r in results for p in r.positions)
    assert covered == list(range(position))  # every position before it has a result, none after
