"""A caller that writes a stream but never reads its results: the sending stops once gRPC's
flow-control window is full, and the caller's window settings decide how far that is."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from support import Harness, until_sending_stops

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
    seen = await until_sending_stops(harness.fake)
    writer.cancel()
    return seen, call


def _logged_batches(caplog: pytest.LogCaptureFixture) -> set[int]:
    """Batches logged for reconciliation: results queued or handed over but not read, and
    calls cut off while under way."""
    return {
        record.batch_index
        for record in caplog.records
        if record.name == "canvas_gateway_server.reporting" and hasattr(record, "batch_index")
    }


async def test_a_stalled_reader_with_a_small_window_puts_few_results_at_risk(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="canvas_gateway_server.reporting")
    sent, call = await _stall(harness, SMALL_WINDOW)
    # About 440 measured: 64 KB of results (~60 bytes each), the stream's queue (64) and its
    # batches in flight (8). Nothing more is sent while the caller does not read.
    assert 100 < sent < 1_000
    call.cancel()
    async with asyncio.timeout(10):
        while harness.gateway.servicer.in_flight.busy:
            await asyncio.sleep(0.05)
    assert len(harness.fake.calls) == sent  # nothing was sent after the caller went away
    # The caller read nothing: every batch that reached Braze is logged for reconciliation.
    assert len(_logged_batches(caplog)) >= sent
    assert any("may not have been read" in r.getMessage() for r in caplog.records)


async def test_a_shutdown_past_its_grace_logs_what_a_stalled_reader_never_read(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="canvas_gateway_server.reporting")
    sent, _call = await _stall(harness, SMALL_WINDOW)
    await harness.gateway.stop(grace=0.5)  # the stream cannot finish: its caller does not read
    assert len(harness.fake.calls) == sent
    assert len(_logged_batches(caplog)) >= sent
