"""One tenant's bulk stream does not starve another tenant's unary sends: each tenant has its
own batches in flight, and a stream's are bounded per request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from support import Harness, until

STREAMED = 30_000
CHUNK = 500


async def _bulk(harness: Harness, done: asyncio.Event) -> int:
    async def messages() -> AsyncIterator[pb.SendStreamRequest]:
        yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="bulk")))
        for start in range(0, STREAMED, CHUNK):
            recipients = [pb.Recipient(external_user_id=f"bulk-{i}") for i in range(start, start + CHUNK)]
            yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients))

    sent = 0
    async for response in harness.stub.SendStream(messages(), metadata=harness.auth("acme"), timeout=120):
        if response.HasField("summary"):
            sent = response.summary.recipients_sent
    done.set()
    return sent


async def test_a_bulk_stream_does_not_starve_another_tenant(harness: Harness) -> None:
    harness.fake.faults.set_latency(0.02)
    request = pb.SendRequest(
        trigger=pb.CanvasTrigger(
            canvas_id="c", recipients=[pb.Recipient(external_user_id=f"g{i}") for i in range(50)]
        )
    )
    done = asyncio.Event()
    bulk = asyncio.create_task(_bulk(harness, done))
    await until(lambda: len(harness.fake.calls) >= 20)  # the stream is in full flow
    latencies: list[float] = []
    while not done.is_set() and len(latencies) < 40:
        started = time.perf_counter()
        reply = await harness.stub.Send(request, metadata=harness.auth("globex"), timeout=10)
        latencies.append(time.perf_counter() - started)
        assert reply.summary.recipients_sent == 50
    assert await bulk == STREAMED
    assert len(latencies) >= 10, "the stream ended before the unary sends could be measured"
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1 if len(latencies) >= 100 else -1]  # the slowest of few
    # Alone, a Send of 50 takes one call (~20 ms). Beside the stream it shares the event loop
    # and the fake, but waits for no slot of the stream's: far under the stream's own duration
    # (600 calls of 20 ms, 8 at a time: 1.5 s at least), which a starved Send would wait out. The
    # bound leaves room for a 2-core machine busy with other work (0.31 s was seen once so).
    assert p99 < 0.5, latencies
