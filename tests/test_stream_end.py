"""How a stream's end is told: a caller's half-close, or a caller cut off (docs/api.md: How a stream ends).

grpcio ends a stream's requests alike when the caller half-closes and when the stream is reset
or its connection lost. A stream cut off with an open batch must not send that batch cut short
(under a key it would be kept as another body than the resume's, and the resume refused); a
half-closed one must send it. Both are checked with many streams at once on a busy event loop,
where the 50 ms wait for the cancellation that the gateway used to make lost every run.

And a caller that never reads, cut off by a shutdown, must see UNAVAILABLE, not INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from servers import haproxy
from support import Cutter, Harness, batches_in_flight, until, until_sending_stops

STREAMS = 30
FULL, PARTIAL = 50, 20  # each stream: one full batch, then an open one
TINY_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 64)]
"""A caller's receive window that a result or two fills: its stream's handler is then inside gRPC's
write when it is cut off, where grpcio's cancellation never reaches the servicer's code."""


def _users(stream: int, count: int = FULL + PARTIAL) -> list[pb.Recipient]:
    return [pb.Recipient(external_user_id=f"s{stream}-u{i}") for i in range(count)]


def _header(stream: int) -> pb.SendStreamRequest:
    trigger = pb.CanvasTrigger(canvas_id="c")
    options = pb.SendOptions(idempotency_key=f"cut-{stream}")
    return pb.SendStreamRequest(header=pb.StreamHeader(trigger=trigger, options=options))


def _chunk(recipients: list[pb.Recipient]) -> pb.SendStreamRequest:
    return pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients))


@contextmanager
def busy_loop(slice_seconds: float = 0.03) -> Iterator[None]:
    """Keep the event loop busy in slices of `slice_seconds`, as a loaded gateway's is: each
    callback of gRPC's (a read's end, a cancellation) waits behind one."""

    async def burn() -> None:
        while True:
            until = time.perf_counter() + slice_seconds
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(burn())
    try:
        yield
    finally:
        task.cancel()


async def _idle(harness: Harness) -> None:
    await until(lambda: not harness.gateway.servicer.in_flight.busy)


async def _send_whole(
    harness: Harness, stream: int, count: int = FULL + PARTIAL
) -> list[pb.SendStreamResponse]:
    """A keyed stream of `count`, half-closed after its last chunk (a cut one's resume)."""

    async def requests() -> AsyncIterator[pb.SendStreamRequest]:
        yield _header(stream)
        yield _chunk(_users(stream, count))

    return [r async for r in harness.stub.SendStream(requests(), metadata=harness.auth())]


@pytest.mark.parametrize("through", ["direct", "haproxy"])
async def test_keyed_streams_cut_off_at_once_send_no_partial_batch_and_the_resume_sends_it_once(
    harness: Harness, through: str
) -> None:
    """A third of the streams lose their connection, a third are cancelled by their caller
    (RST_STREAM) and a third have their channel closed, each with one batch sent and 20
    recipients in an open batch, all at once on a busy loop; straight to the gateway, or through
    the deployment's HAProxy, which then ends the streams to the gateway itself."""
    async with contextlib.AsyncExitStack() as stack:
        target = harness.target
        if through == "haproxy":
            backend = (harness.target, f"127.0.0.1:{harness.gateway.admin_port}")
            target = (await stack.enter_async_context(haproxy([backend]))).address
        cutter = await stack.enter_async_context(Cutter(int(target.rsplit(":", 1)[1])))
        lost = grpc.aio.insecure_channel(f"127.0.0.1:{cutter.port}", options=TINY_WINDOW)
        cancelling = grpc.aio.insecure_channel(target, options=TINY_WINDOW)
        closing = grpc.aio.insecure_channel(target, options=TINY_WINDOW)
        calls: list[grpc.aio.StreamStreamCall] = []  # type: ignore[type-arg]
        for stream in range(STREAMS):
            channel = (cancelling, lost, closing)[stream % 3]
            call = pb_grpc.CanvasGatewayServiceStub(channel).SendStream(metadata=harness.auth())
            await call.write(_header(stream))
            await call.write(_chunk(_users(stream)))  # never half-closed
            calls.append(call)
        # Every full batch has gone, and its answer is back and kept: it is SENT, not cut off while
        # Braze was being called (which would keep it UNKNOWN, rightly, and the resume would say so).
        await until(lambda: len(harness.fake.calls) == STREAMS and not batches_in_flight(harness.gateway))
        with busy_loop():
            cutter.cut()
            for call in calls[::3]:
                call.cancel()
            await closing.close()
            await _idle(harness)
        await lost.close()
        await cancelling.close()
    assert Counter(len(c.body["recipients"]) for c in harness.fake.calls) == {FULL: STREAMS}

    resumed = await asyncio.gather(*(_send_whole(harness, stream) for stream in range(STREAMS)))
    for answers in resumed:
        results = sorted((r.result for r in answers if r.HasField("result")), key=lambda r: r.batch_index)
        # The full batch is replayed; the open one is sent now, whole, for the first time.
        assert [(r.outcome, r.replayed) for r in results] == [
            (pb.OUTCOME_SENT, True),
            (pb.OUTCOME_SENT, False),
        ]
    got = Counter(r["external_user_id"] for c in harness.fake.calls for r in c.body["recipients"])
    assert len(got) == STREAMS * (FULL + PARTIAL) and set(got.values()) == {1}


@pytest.mark.parametrize("count", [FULL + PARTIAL, PARTIAL])
async def test_half_closed_keyed_streams_send_their_partial_last_batch(harness: Harness, count: int) -> None:
    """The same load, half-closed: every open batch goes, whether or not a result was written
    before the end (with 20 recipients, none was)."""
    with busy_loop(slice_seconds=0.005):
        streams = await asyncio.gather(*(_send_whole(harness, s, count) for s in range(STREAMS // 2)))
    for answers in streams:
        assert answers[-1].summary.recipients_sent == count
        # Each result, then the empty message written at the end of the requests, then the summary.
        assert sum(1 for r in answers if r.WhichOneof("part") is None) == 1
    assert sum(len(c.body["recipients"]) for c in harness.fake.calls) == STREAMS // 2 * count


async def test_a_stream_without_a_key_never_gets_the_empty_message(harness: Harness) -> None:
    """Callers written before the empty message (every message not a result is the summary)
    stay right: only keyed streams wait for the proof."""
    trigger = pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c")))
    call = harness.stub.SendStream(iter([trigger, _chunk(_users(0))]), metadata=harness.auth())
    answers = [answer async for answer in call]
    assert [a.WhichOneof("part") for a in answers] == ["result", "result", "summary"]
    assert answers[-1].summary.recipients_sent == FULL + PARTIAL


async def test_a_caller_that_never_reads_cut_off_by_shutdown_sees_unavailable(harness: Harness) -> None:
    """SIGTERM's drain (`Gateway.stop`) with a caller that never reads and writes on for 4 s
    into it, then half-closes. Its results fill its window, so its stream waits for its batches,
    reading nothing, and is cut off when the grace ends; grpcio's client reports INTERNAL if one
    of its writes is still waiting then (grpc/grpc#36066). The gateway reads and drops what such
    a caller writes from the start of the drain while the RPC lasts: it sees UNAVAILABLE."""
    shutting_down = harness.gateway.shutting_down
    channel = grpc.aio.insecure_channel(harness.target, options=[("grpc.http2.bdp_probe", 0)])
    call = pb_grpc.CanvasGatewayServiceStub(channel).SendStream(metadata=harness.auth())
    await call.write(pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c"))))

    async def write() -> None:
        loop = asyncio.get_running_loop()
        until = None
        start = 0
        while until is None or loop.time() < until:
            await call.write(_chunk([pb.Recipient(external_user_id=f"u{start + i}") for i in range(500)]))
            start += 500
            if until is None and shutting_down.is_set():
                until = loop.time() + 4.0  # the stream is cut 0.5 + 5 s after this
        await call.done_writing()

    writer = asyncio.create_task(write())
    await until_sending_stops(harness.fake)
    await harness.gateway.stop(grace=0.5)
    await writer  # every write went through, and the half-close
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        async for _ in call:
            pass
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    await channel.close()
