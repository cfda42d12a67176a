"""Scale-out through a real HAProxy (deploy/haproxy/haproxy.cfg, as deployed) in front of three
real gateway processes, all sending to one fake Braze.

HAProxy balances each gRPC call (an HTTP/2 stream), not each connection: the calls of ONE
channel reach every replica, as each replica's own /metrics shows. A SendStream and its summary
come back whole through it, and an error's rich status (trailers) intact. A replica that gets
SIGTERM is taken out by the /readyz health check during its not-ready delay, so no call fails
while it drains and exits, and later calls go to the others.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from fake_braze import FakeBraze
from prometheus_client.parser import text_string_to_metric_families
from servers import REPLICA_SHUTDOWN_DELAY, Balancer, Replica, haproxy, start_replica, stop_process
from support import FAKE_URLS, TOKENS, tenants_toml, violations_of

AUTH = (("authorization", f"Bearer {TOKENS['acme']}"),)
REPLICAS = 3


@dataclass
class Cluster:
    replicas: list[Replica]
    balancer: Balancer
    channel: grpc.aio.Channel
    stub: pb_grpc.CanvasGatewayServiceAsyncStub


@pytest.fixture
async def cluster(fake: FakeBraze, tmp_path: Path) -> AsyncIterator[Cluster]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    async with aiohttp.ClientSession() as session:
        started = await asyncio.gather(
            *(start_replica(tenants, session) for _ in range(REPLICAS)), return_exceptions=True
        )
    replicas = [replica for replica in started if isinstance(replica, Replica)]
    try:
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        async with (
            haproxy([(r.address, r.admin) for r in replicas]) as balancer,
            grpc.aio.insecure_channel(balancer.address) as channel,
        ):
            yield Cluster(replicas, balancer, channel, pb_grpc.CanvasGatewayServiceStub(channel))
    finally:
        # Killed, not drained: each drain would cost REPLICA_SHUTDOWN_DELAY (the drain test drains its own).
        await asyncio.gather(*(stop_process(r.process, signal.SIGKILL) for r in replicas))


def request(recipients: int, first: int = 0) -> pb.SendRequest:
    users = [pb.Recipient(external_user_id=f"u{first + i}") for i in range(recipients)]
    return pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", recipients=users))


def stream_messages(total: int, per_chunk: int, invalid_every: int) -> list[pb.SendStreamRequest]:
    """A header, then `total` recipients in chunks; every `invalid_every`-th is an email without
    the prioritization Braze requires, which the gateway rejects alone (position 0 included)."""
    recipients = [
        pb.Recipient(email=f"p{i}@example.com")
        if i % invalid_every == 0
        else pb.Recipient(external_user_id=f"s{i}")
        for i in range(total)
    ]
    head = pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c")))
    return [head] + [
        pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients[i : i + per_chunk]))
        for i in range(0, total, per_chunk)
    ]


async def sends_handled(replica: Replica) -> int:
    """Send RPCs this replica has handled, from its own /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"http://{replica.admin}/metrics") as reply:
        text = await reply.text()
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "grpc_server_handled"
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels["grpc_method"] == "Send"
        )
    )


async def test_the_calls_of_one_channel_are_spread_over_every_replica(
    cluster: Cluster, fake: FakeBraze
) -> None:
    connections = await cluster.balancer.frontend_connections()
    calls = 30
    replies = await asyncio.gather(
        *(cluster.stub.Send(request(2, 10 * i), metadata=AUTH, timeout=10) for i in range(calls))
    )
    assert [reply.summary.recipients_sent for reply in replies] == [2] * calls
    assert len(fake.sent()) == calls
    # One channel, one connection to HAProxy...
    assert await cluster.balancer.frontend_connections() == connections + 1
    # ...and each replica handled its share of the calls (round robin: 10 each).
    handled = await asyncio.gather(*(sends_handled(replica) for replica in cluster.replicas))
    assert sum(handled) == calls, handled
    assert min(handled) >= 5, handled


async def test_a_stream_and_an_error_s_details_come_back_whole_through_the_balancer(
    cluster: Cluster, fake: FakeBraze
) -> None:
    total = 500
    results: list[pb.BatchResult] = []
    summaries: list[pb.SendSummary] = []
    messages = stream_messages(total, 100, invalid_every=100)

    async def requests() -> AsyncIterator[pb.SendStreamRequest]:
        for message in messages:
            yield message

    async for response in cluster.stub.SendStream(requests(), metadata=AUTH, timeout=30):
        if response.HasField("result"):
            assert not summaries, "a result after the summary"
            results.append(response.result)
        elif response.HasField("summary"):  # a message with no part is skipped
            summaries.append(response.summary)
    assert sorted(p for r in results for p in r.positions) == list(range(total))  # each exactly once
    (summary,) = summaries
    assert summary.recipients == total
    assert summary.recipients_rejected == 5  # positions 0, 100, ...: an email without prioritization
    assert summary.recipients_sent == total - 5
    assert sum(len(call.body["recipients"]) for call in fake.calls) == total - 5

    # An invalid Send: INVALID_ARGUMENT and its google.rpc.BadRequest, which travels in the
    # grpc-status-details-bin trailer, exactly as the replica answers it directly. 300 violations
    # fill the details to the gateway's budget (about 4 KB of base64).
    invalid = pb.SendRequest(
        trigger=pb.CanvasTrigger(
            canvas_id="c", recipients=[pb.Recipient(email=f"p{i}@example.com") for i in range(300)]
        )
    )
    errors: list[grpc.aio.AioRpcError] = []
    async with grpc.aio.insecure_channel(cluster.replicas[0].address) as direct:
        for stub in (cluster.stub, pb_grpc.CanvasGatewayServiceStub(direct)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Send(invalid, metadata=AUTH, timeout=10)
            errors.append(caught.value)
    through, direct_error = errors
    assert through.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = violations_of(through)
    assert len(violations) > 10 and violations[0][0] == "recipients[0].prioritization"
    assert violations == violations_of(direct_error)
    assert through.details() == direct_error.details()


async def test_a_replica_that_drains_is_taken_out_and_no_call_fails(cluster: Cluster) -> None:
    leaving, *staying = cluster.replicas
    balancer = cluster.balancer
    calls = 0

    async def call() -> None:
        nonlocal calls
        reply = await cluster.stub.Send(request(1, 1000 + calls), metadata=AUTH, timeout=10)
        assert reply.summary.recipients_sent == 1
        calls += 1

    leaving.process.send_signal(signal.SIGTERM)
    # /readyz says 503 at once: HAProxy's checks mark the replica DOWN while it still serves,
    # before it stops accepting (a TCP check, or none, would keep it UP until it exits).
    started = time.monotonic()
    while (await balancer.servers())["gateway-1"] != "DOWN":
        await call()  # calls keep succeeding, wherever they go
        assert leaving.process.returncode is None, "the replica exited before HAProxy took it out"
        assert time.monotonic() - started < REPLICA_SHUTDOWN_DELAY, await balancer.servers()
        await asyncio.sleep(0.05)
    assert await balancer.servers() == {"gateway-1": "DOWN", "gateway-2": "UP", "gateway-3": "UP"}
    # While it drains and exits, and after, every call succeeds on the others.
    before = [await sends_handled(replica) for replica in staying]
    async with asyncio.timeout(30):  # its not-ready delay, then its drain (grace 5 s)
        while leaving.process.returncode is None:
            await call()
            await asyncio.sleep(0.05)
    assert leaving.process.returncode == 0
    for _ in range(12):
        await call()
    after = [await sends_handled(replica) for replica in staying]
    deltas = [b - a for a, b in zip(before, after, strict=True)]
    assert min(deltas) >= 1 and sum(deltas) >= 12, deltas
    assert calls >= 12
