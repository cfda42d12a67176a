"""The Python client's resume when the caller's source goes on after the drain, when no gateway
comes back, and when retryable results are held back: against real gateways on 127.0.0.1 and the
fake Braze. Every position gets exactly one result, and no recipient reaches Braze twice."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from canvas_gateway_client import CanvasGatewayClient, error_info, pb, resume_position
from canvas_gateway_client.tracking import MAX_HELD_RESULTS
from canvas_gateway_server.app import Gateway
from canvas_gateway_server.settings import Settings
from fake_braze import FakeBraze
from support import FAKE_URLS, LOCAL, TOKENS, free_port, start_gateway, tenants_toml, until

GATED_AT = 1_030  # the source waits here; chunks of 70: the gateway reads 980, sends 950, cuts 30
COUNT = 2_030


def _settings(tmp_path: Path, braze_url: str) -> Settings:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(braze_url))
    return Settings.from_env(
        {},
        grpc_address=f"127.0.0.1:{free_port()}",
        tenants_file=str(tenants),
        retry_base_delay_seconds=0.01,
        idempotency_file=str(tmp_path / "keys.sqlite3"),  # not the host's default, kept in /tmp
        **LOCAL,
    )


def _sent(fake: FakeBraze) -> Counter[str]:
    return Counter(r["external_user_id"] for call in fake.calls for r in call.body["recipients"])


class Gated:
    """Recipients u0 ... u<COUNT-1>, each with context {"n": i}, that wait at GATED_AT."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[pb.Recipient]:
        for i in range(COUNT):
            if i == GATED_AT:
                await self.gate.wait()
            recipient = pb.Recipient(external_user_id=f"u{i}")
            recipient.context.update({"n": i})
            yield recipient


async def test_the_source_goes_on_in_the_resumed_stream(fake: FakeBraze, tmp_path: Path) -> None:
    """The drain cuts a batch (NOT_ATTEMPTED, held back and sent again) while the source waits;
    the read it was waiting on is not lost to the old stream but goes on in the new one."""
    settings = _settings(tmp_path, FAKE_URLS[id(fake)])
    fake.faults.set_latency(0.02)
    first = await start_gateway(settings)
    second: Gateway | None = None
    source = Gated()
    responses: list[pb.SendStreamResponse] = []
    async with CanvasGatewayClient(settings.listen.grpc_address, TOKENS["acme"]) as client:

        async def consume() -> None:
            async for response in client.send_stream({"canvas_id": "c"}, source, chunk_size=70, resumes=3):
                responses.append(response)

        consuming = asyncio.create_task(consume())
        try:
            await until(lambda: sum(_sent(fake).values()) == 950)  # 19 batches: the 20th is open
            await first.stop(grace=5)
            assert sum(_sent(fake).values()) == 950  # the open batch of 30 was not sent: cut
            second = await start_gateway(settings)
            source.gate.set()
            async with asyncio.timeout(60):
                await consuming
        finally:
            consuming.cancel()
            if second is not None:
                await second.stop(grace=0)

    *results, last = responses
    batches = [r.result for r in results]
    positions = Counter(p for b in batches for p in b.positions)
    assert sorted(positions) == list(range(COUNT)) and set(positions.values()) == {1}
    assert {b.outcome for b in batches} == {pb.OUTCOME_SENT}  # the cut batch was sent, not reported
    assert len({b.batch_index for b in batches}) == len(batches)
    assert _sent(fake) == Counter(f"u{i}" for i in range(COUNT))  # each once
    for batch in batches:  # position i is u<i>, whichever stream carried it
        call = next(c for c in fake.calls if c.dispatch_id == batch.braze.dispatch_id)
        assert [r["context"]["n"] for r in call.body["recipients"]] == list(batch.positions)
    summary = last.summary
    assert (summary.recipients, summary.recipients_sent, summary.batches) == (COUNT, COUNT, len(batches))
    assert len(summary.request_id.split(",")) >= 2  # each stream's request id


async def test_when_no_gateway_comes_back_the_held_results_are_yielded(
    fake: FakeBraze, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, FAKE_URLS[id(fake)])
    gateway = await start_gateway(settings)
    source = Gated()
    results: list[pb.BatchResult] = []
    async with CanvasGatewayClient(settings.listen.grpc_address, TOKENS["acme"]) as client:

        async def consume() -> None:
            stream = client.send_stream({"canvas_id": "c"}, source, chunk_size=70, resumes=2, resume_wait=0.5)
            async for response in stream:
                results.append(response.result)

        consuming = asyncio.create_task(consume())
        await until(lambda: sum(_sent(fake).values()) == 950)
        await gateway.stop(grace=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(30):
                await consuming

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info is not None and (info.domain, info.reason) == ("canvas-gateway.internal", "DRAINING")
    assert resume_position(caught.value) == 980
    positions = Counter(p for r in results for p in r.positions)
    assert sorted(positions) == list(range(980)) and set(positions.values()) == {1}
    (cut,) = [r for r in results if r.outcome == pb.OUTCOME_NOT_ATTEMPTED]
    assert list(cut.positions) == list(range(950, 980)) and cut.retryable


async def test_results_held_for_a_resume_are_yielded_once_when_the_stream_ends(tmp_path: Path) -> None:
    """Braze refuses connections: every batch is a retryable NOT_ATTEMPTED. Held back for a
    resume that never comes, each is yielded once: the oldest as soon as too many are held."""
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    gateway = await start_gateway(_settings(tmp_path, url))
    count = (MAX_HELD_RESULTS + 6) * 50
    try:
        async with CanvasGatewayClient(f"127.0.0.1:{gateway.port}", TOKENS["acme"]) as client:
            async with asyncio.timeout(60):
                responses: list[pb.SendStreamResponse] = []
                async for response in client.send_stream(
                    {"canvas_id": "c"},
                    ({"external_user_id": f"u{i}"} for i in range(count)),
                    resumes=1,
                ):
                    responses.append(response)
    finally:
        await gateway.stop(grace=0)

    *results, last = responses
    positions = Counter(p for r in results for p in r.result.positions)
    assert sorted(positions) == list(range(count)) and set(positions.values()) == {1}
    assert {(r.result.outcome, r.result.retryable) for r in results} == {(pb.OUTCOME_NOT_ATTEMPTED, True)}
    assert last.summary.recipients_not_attempted == count and last.summary.batches == len(results)
