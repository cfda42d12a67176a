"""A caller that writes a stream but never reads its results: the sending stops once gRPC's
flow-control window is full, and the caller's window settings decide how far that is."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from conftest import Harness

SMALL_WINDOW = [("grpc.http2.bdp_probe", 0)]  # the receive window stays at HTTP/2's 64 KB


async def _stall(harness: Harness, options: list[tuple[str, int]]) -> tuple[int, grpc.aio.StreamStreamCall]:  # type: ignore[type-arg]
    """Open a stream that writes chunks and never reads; return the calls the fake got once they stop."""
    channel = grpc.aio.insecure_channel(harness.target, options=options)
    call = pb_grpc.CanvasGatewayServiceStub(channel).SendStream(metadata=harness.auth())
    await call.write(pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c"))))

    async def write() -> None:
        for start in range(0, 10**7, 500):
            recipients = [pb.Recipient(external_user_id=f"u{start + i}") for i in range(500)]
            await call.write(pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients)))

    writer = asyncio.create_task(write())
    seen = -1
    async with asyncio.timeout(30):
        while (count := len(harness.fake.calls)) != seen:  # until the sending has stopped for 1 s
            seen = count
            await asyncio.sleep(1.0)
    writer.cancel()
    return seen, call


async def test_a_stalled_reader_with_a_small_window_puts_few_results_at_risk(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    sent, call = await _stall(harness, SMALL_WINDOW)
    # About 440 measured: 64 KB of results (~60 bytes each), the stream's queue (64) and its
    # batches in flight (8). Nothing more is sent while the caller does not read.
    assert 100 < sent < 1_000
    caplog.set_level(logging.ERROR, logger="canvas_gateway_server.dispatch")
    call.cancel()
    async with asyncio.timeout(10):
        while harness.gateway.servicer.in_flight.busy:
            await asyncio.sleep(0.05)
    logged = [r for r in caplog.records if "not delivered" in r.getMessage()]
    assert logged, "the results the gateway still held were not logged for reconciliation"
    assert len(harness.fake.calls) == sent  # and nothing was sent after the caller went away
