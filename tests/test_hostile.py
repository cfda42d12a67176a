"""Client garbage looks like client garbage: messages that do not decode are INVALID_ARGUMENT
with a short fixed text, after authentication, with no traceback and a throttled log line."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from support import Harness, violations_of

SEND = "/canvas_gateway.v1.CanvasGatewayService/Send"
SEND_STREAM = "/canvas_gateway.v1.CanvasGatewayService/SendStream"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _deep_audience(depth: int) -> bytes:
    node = b""
    for _ in range(depth):
        node = _field(1, node)  # Audience.all_of = [node]
    return node


UNDECODABLE = {
    "truncated": b"\x0a\x05\x0a\x01",
    "bad wire type": b"\x0f\xff\xff",
    "invalid UTF-8 in canvas_id": _field(1, _field(1, b"\xff\xfe")),
    "nested past protobuf's limit": _field(1, _field(5, _deep_audience(150))),
}


def _raw_send(harness: Harness) -> grpc.aio.UnaryUnaryMultiCallable[bytes, pb.SendResponse]:
    return harness.channel.unary_unary(SEND, response_deserializer=pb.SendResponse.FromString)


@pytest.mark.parametrize("raw", UNDECODABLE.values(), ids=UNDECODABLE.keys())
async def test_a_request_that_does_not_decode_is_invalid_argument(
    harness: Harness, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _raw_send(harness)(raw, metadata=harness.auth())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "request: not a valid SendRequest message: it does not decode"
    assert violations_of(caught.value) == [("request", "not a valid SendRequest message: it does not decode")]
    assert harness.fake.calls == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_an_unauthenticated_caller_learns_nothing_about_decoding(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _raw_send(harness)(UNDECODABLE["truncated"])
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_flood_of_garbage_logs_one_line(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="canvas_gateway_server.edge.servicer")
    for _ in range(50):
        with pytest.raises(grpc.aio.AioRpcError):
            await _raw_send(harness)(UNDECODABLE["bad wire type"], metadata=harness.auth())
    refusals = [r for r in caplog.records if "does not decode" in r.getMessage()]
    assert len(refusals) <= 1  # one per 10 s; an earlier test may have used this window's line


def _stream(harness: Harness) -> grpc.aio.StreamStreamMultiCallable[bytes, pb.SendStreamResponse]:
    return harness.channel.stream_stream(SEND_STREAM, response_deserializer=pb.SendStreamResponse.FromString)


async def test_a_stream_whose_header_does_not_decode_sends_nothing(harness: Harness) -> None:
    async def messages() -> AsyncIterator[bytes]:
        yield UNDECODABLE["invalid UTF-8 in canvas_id"]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in _stream(harness)(messages(), metadata=harness.auth()):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations_of(caught.value)[0][0] == "messages[0]"
    assert harness.fake.calls == []


async def test_a_chunk_that_does_not_decode_ends_the_stream_after_the_results_under_way(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    header = pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c")))
    chunk = pb.SendStreamRequest(
        chunk=pb.RecipientChunk(recipients=[pb.Recipient(external_user_id=f"u{i}") for i in range(120)])
    )

    async def messages() -> AsyncIterator[bytes]:
        yield header.SerializeToString()
        yield chunk.SerializeToString()
        yield _field(2, _field(1, _field(1, b"\xff")))  # a chunk whose external_user_id is not UTF-8

    results: list[pb.BatchResult] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in _stream(harness)(messages(), metadata=harness.auth()):
            results.append(response.result)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations_of(caught.value)[0][0] == "messages[2]"
    assert sorted(p for r in results for p in r.positions) == list(range(120))  # every one accounted for
    sent = sum(len(call.body["recipients"]) for call in harness.fake.calls)
    assert sent == sum(len(r.positions) for r in results if r.outcome == pb.OUTCOME_SENT)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("settings_overrides", [{"stream_header_timeout_seconds": 0.3}])
async def test_a_stream_that_sends_no_header_in_time_ends_deadline_exceeded(harness: Harness) -> None:
    never = asyncio.Event()

    async def messages() -> AsyncIterator[bytes]:
        await never.wait()  # an authenticated caller that opens a stream and says nothing
        yield b""

    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in _stream(harness)(messages(), metadata=harness.auth(), timeout=20):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.details() == "no stream header within 0.3 s; nothing was sent"
    assert time.monotonic() - started < 10  # the header timeout and the 2 s drain, not the call's 20 s
    assert not harness.gateway.servicer.in_flight.busy
