"""Connections age out, so clients behind a balancer spread over new replicas; calls under way
finish first, however long a bulk stream takes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server.settings import Settings
from conftest import Harness

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
        Settings(demo=True, max_connection_age_seconds=90, max_connection_age_grace_seconds=5).grpc_options()
    )
    assert options["grpc.max_connection_age_ms"] == 90_000
    assert options["grpc.max_connection_age_grace_ms"] == 5_000
    assert options["grpc.keepalive_time_ms"] == 60_000
    unlimited = dict(Settings(demo=True, max_connection_age_seconds=0).grpc_options())
    assert (
        "grpc.max_connection_age_ms" not in unlimited and "grpc.max_connection_age_grace_ms" not in unlimited
    )
