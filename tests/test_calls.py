"""Request ids and logs as an operator reads them: one access line per RPC, one line per batch
that did not end SENT, refused tokens, reconciliation lines, all carrying the request id."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server import logs
from fake_braze import FakeBrazeConfig
from support import KEYS, TOKENS, Harness, health_check, learn_budget

REQUEST = pb.SendRequest(
    trigger=pb.CanvasTrigger(
        canvas_id="c", recipients=[pb.Recipient(external_user_id=f"u{i}") for i in range(120)]
    )
)


class Captured:
    """What the gateway's configured log handler wrote."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def matching(self, message: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if re.search(message, r["message"])]

    async def logged(self, message: str) -> list[dict[str, Any]]:
        """`matching`, once there is a match: a call that fails sends its status before its
        access line is written, so its caller may be told first."""
        async with asyncio.timeout(5):
            while not self.matching(message):
                await asyncio.sleep(0.01)
        return self.matching(message)


@pytest.fixture
def captured(harness: Harness) -> Iterator[Captured]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = Captured()
    logs.configure("INFO", "json", harness.gateway.tenants.secrets, stream=out.stream)
    try:
        yield out
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


async def test_the_callers_request_id_is_returned_and_on_the_access_line(
    harness: Harness, captured: Captured
) -> None:
    metadata = (*harness.auth(), ("x-request-id", "order-7f3a"))
    call = harness.stub.Send(REQUEST, metadata=metadata)
    assert (await call.initial_metadata())["x-request-id"] == "order-7f3a"
    reply = await call
    assert reply.summary.request_id == "order-7f3a"

    (line,) = captured.matching("^rpc Send")
    assert line["request_id"] == "order-7f3a" and line["level"] == "INFO"
    assert line["logger"] == "canvas_gateway_server.access"
    assert line["tenant"] == "acme" and line["grpc_code"] == "OK"
    assert line["method"] == "/canvas_gateway.v1.CanvasGatewayService/Send"
    assert line["peer"].startswith("ipv4:127.0.0.1:")
    assert (line["recipients"], line["batches"]) == (120, 3)
    outcomes = {"sent": 120, "rejected": 0, "unknown": 0, "not_attempted": 0, "canvas_inactive": 0}
    assert line["outcomes"] == outcomes
    assert "grpc_message" not in line  # an OK call has no reason to give
    assert line["duration_ms"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", line["time"])


@pytest.mark.parametrize("given", ["has space", "x" * 129, ""])
async def test_an_unusable_request_id_is_replaced(harness: Harness, captured: Captured, given: str) -> None:
    call = harness.stub.Send(REQUEST, metadata=(*harness.auth(), ("x-request-id", given)))
    made = (await call.initial_metadata())["x-request-id"]
    assert isinstance(made, str) and re.fullmatch(r"[0-9a-f]{32}", made)
    assert (await call).summary.request_id == made
    assert captured.matching("^rpc Send")[0]["request_id"] == made


async def test_a_refused_token_logs_the_peer_and_reason_never_the_token(
    harness: Harness, captured: Captured
) -> None:
    wrong = "Bearer " + TOKENS["acme"] + "-wrong"
    call = harness.stub.Send(REQUEST, metadata=(("authorization", wrong), ("x-request-id", "r-1")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await call.initial_metadata())["x-request-id"] == "r-1"  # failed calls can be quoted too
    (refusal,) = captured.matching("^refused a call")
    assert refusal["reason"] == "unknown_token" and refusal["request_id"] == "r-1"
    assert refusal["peer"].startswith("ipv4:127.0.0.1:")
    (access,) = await captured.logged("^rpc Send")
    assert access["grpc_code"] == "UNAUTHENTICATED" and access["level"] == "WARNING"
    assert access["grpc_message"] == "unknown bearer token"  # the reason the caller was given
    assert access["tenant"] == "-"
    assert TOKENS["acme"] not in captured.stream.getvalue()


@pytest.mark.parametrize("fake_config", [FakeBrazeConfig(api_keys=frozenset({KEYS["globex"]}))])
async def test_every_batch_that_was_not_sent_has_a_line_with_brazes_scrubbed_words(
    harness: Harness, captured: Captured
) -> None:
    await harness.stub.Send(REQUEST, metadata=(*harness.auth(), ("x-request-id", "revoked-1")))
    lines = captured.matching(r"^batch \d+ REJECTED")
    assert sorted(line["batch_index"] for line in lines) == [0, 1, 2]
    first = next(line for line in lines if line["batch_index"] == 0)
    assert first["request_id"] == "revoked-1" and first["tenant"] == "acme"
    assert first["positions"] == [[0, 49]] and first["recipients"] == 50 and first["outcome"] == "REJECTED"
    last = next(line for line in lines if line["batch_index"] == 2)
    assert (last["positions"], last["recipients"]) == ([[100, 119]], 20)
    assert (first["http_status"], first["attempts"], first["code"]) == (401, 1, "INTERNAL")
    assert first["braze_message"] == "Invalid API key: [REDACTED]"  # Braze's 401 echoes the key
    assert KEYS["acme"] not in captured.stream.getvalue()


async def test_sent_batches_and_health_checks_add_no_lines(harness: Harness, captured: Captured) -> None:
    await harness.stub.Send(REQUEST, metadata=harness.auth())
    await health_check(harness, "")
    assert [r["message"] for r in captured.records()] == ["rpc Send OK"]


async def test_a_call_cut_off_with_its_caller_is_logged_under_its_request_id(
    harness: Harness, captured: Captured
) -> None:
    await learn_budget(harness)  # then both batches go at once
    harness.fake.faults.set_latency(2.0)

    async def one_chunk() -> AsyncIterator[pb.SendStreamRequest]:
        yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=REQUEST.trigger))
        await asyncio.sleep(30)  # the caller goes away before it ends its input

    call = harness.stub.SendStream(one_chunk(), metadata=(*harness.auth(), ("x-request-id", "gone-1")))
    async with asyncio.timeout(10):
        while harness.fake.in_progress < 2:  # both full batches are at the fake Braze (20 wait for more)
            await asyncio.sleep(0.01)
    call.cancel()
    async with asyncio.timeout(10):
        while len(captured.matching("was cancelled with its caller")) < 2:
            await asyncio.sleep(0.01)
    cut = captured.matching("was cancelled with its caller")
    assert sorted(line["batch_index"] for line in cut) == [0, 1]
    assert all(line["request_id"] == "gone-1" for line in cut)
    async with asyncio.timeout(10):
        while not captured.matching("^rpc SendStream"):
            await asyncio.sleep(0.01)
    (access,) = captured.matching("^rpc SendStream")
    assert access["grpc_code"] == "CANCELLED" and access["request_id"] == "gone-1"


def test_text_lines_carry_the_request_id_and_the_event_fields() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    try:
        logs.configure("INFO", "text", lambda: frozenset({"s3cret"}), stream=out)
        token = logs.REQUEST_ID.set("req-9")
        try:
            logging.getLogger("t").warning(
                "batch %d REJECTED", 4, extra={"tenant": "acme", "said": "bad s3cret"}
            )
        finally:
            logs.REQUEST_ID.reset(token)
        logging.getLogger("t").info("outside")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    first, second = out.getvalue().splitlines()
    assert first.endswith("WARNING t [req-9] batch 4 REJECTED tenant=acme said='bad [REDACTED]'")
    assert second.endswith("INFO t [-] outside")


def _log_one(log_format: str, worker: int | None, **fields: Any) -> str:
    """What `configure(log_format, worker=worker)` writes for one record with `fields`."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    try:
        logs.configure("INFO", log_format, lambda: frozenset({"s3cret"}), stream=out, worker=worker)
        logging.getLogger("t").warning("batch 4 REJECTED", extra=fields)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    return out.getvalue().strip()


def test_counts_and_ranges_are_json_structures_and_readable_text() -> None:
    fields = {
        "positions": logs.Ranges.of([7, 0, 1, 2, 4, 5, 9]),
        "recipients": 7,
        "outcomes": logs.Counts(sent=2, rejected=0),
    }
    assert json.loads(_log_one("json", None, **fields))["positions"] == [[0, 2], [4, 5], [7, 7], [9, 9]]
    line = json.loads(_log_one("json", None, **fields))
    assert (line["recipients"], line["outcomes"]) == (7, {"sent": 2, "rejected": 0})
    assert "worker" not in line  # one process: no worker field
    text = _log_one("text", None, **fields)
    assert text.endswith("batch 4 REJECTED positions=0..2,4..5,7,9 recipients=7 outcomes='sent:2 rejected:0'")
    assert str(logs.Ranges.of([])) == "none"


def test_a_workers_records_carry_its_index() -> None:
    line = json.loads(_log_one("json", 1, tenant="acme", said="bad s3cret"))
    assert (line["worker"], line["tenant"], line["said"]) == (1, "acme", "bad [REDACTED]")
    assert _log_one("text", 0, tenant="acme").endswith("batch 4 REJECTED tenant=acme worker=0")


async def test_a_refused_calls_access_line_gives_the_reason_it_was_refused(
    harness: Harness, captured: Captured
) -> None:
    missing = harness.stub.Send(REQUEST, metadata=(("x-request-id", "no-token"),))
    invalid = pb.SendRequest(trigger=pb.CanvasTrigger(recipients=REQUEST.trigger.recipients))
    empty = harness.stub.Send(invalid, metadata=(*harness.auth(), ("x-request-id", "no-canvas")))
    told = {}
    for call, code in ((missing, grpc.StatusCode.UNAUTHENTICATED), (empty, grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == code
        told[code.name] = caught.value.details()
    await captured.logged("^rpc Send INVALID_ARGUMENT")
    await captured.logged("^rpc Send UNAUTHENTICATED")
    by_id = {line["request_id"]: line for line in captured.matching("^rpc Send")}
    assert by_id["no-token"]["grpc_message"] == told["UNAUTHENTICATED"]
    assert told["UNAUTHENTICATED"] == "missing bearer token in `authorization` metadata"
    assert by_id["no-canvas"]["grpc_message"] == told["INVALID_ARGUMENT"] == "canvas_id: is required"
    assert by_id["no-canvas"]["tenant"] == "acme" and by_id["no-canvas"]["recipients"] == 0


@pytest.mark.parametrize("settings_overrides", [{"max_streams_per_tenant": 1}])
async def test_a_stream_refused_for_a_cap_says_which_on_its_access_line(
    harness: Harness, captured: Captured
) -> None:
    release = asyncio.Event()

    async def holding() -> AsyncIterator[pb.SendStreamRequest]:
        yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c")))
        await release.wait()
        yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=[pb.Recipient(external_user_id="u")]))

    held = harness.stub.SendStream(holding(), metadata=harness.auth())
    async with asyncio.timeout(10):
        while harness.gateway.servicer.streams.open < 1:
            await asyncio.sleep(0.01)
    refused = harness.stub.SendStream(holding(), metadata=(*harness.auth(), ("x-request-id", "capped")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in refused:
            pass  # pragma: no cover - refused before any answer
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (line,) = await captured.logged("^rpc SendStream RESOURCE_EXHAUSTED")
    assert line["request_id"] == "capped" and line["grpc_message"] == caught.value.details()
    assert "CGW_MAX_STREAMS_PER_TENANT" in line["grpc_message"]
    release.set()
    assert [r async for r in held][-1].summary.recipients_sent == 1


SEND = "/canvas_gateway.v1.CanvasGatewayService/Send"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


async def _never() -> AsyncIterator[bytes]:
    await asyncio.Event().wait()
    yield b""  # pragma: no cover - never reached


async def _nothing() -> AsyncIterator[bytes]:
    nothing: tuple[bytes, ...] = ()
    for message in nothing:
        yield message


@pytest.mark.parametrize("settings_overrides", [{"request_message_timeout_seconds": 0.3}])
@pytest.mark.parametrize("method", [SEND, HEALTH_CHECK])
async def test_a_unary_call_whose_message_never_comes_ends_deadline_exceeded(
    harness: Harness, captured: Captured, method: str
) -> None:
    # grpcio waits for a unary call's message before its handler runs, with no limit of its own:
    # such calls held their connection open for good. Opened as a stream that sends nothing.
    multicallable: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = harness.channel.stream_unary(method)
    call = multicallable(_never(), metadata=harness.auth())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call, 10)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.details() == "no request message within 0.3 s; nothing was done"
    if method == SEND:
        (line,) = await captured.logged("^rpc Send")
        assert line["grpc_code"] == "DEADLINE_EXCEEDED"
    assert not harness.fake.calls


async def test_a_unary_call_that_ends_without_its_message_is_invalid(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        # grpcio alone never answered such a call: it returned without a status.
        multicallable: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = harness.channel.stream_unary(SEND)
        await asyncio.wait_for(multicallable(_nothing(), metadata=harness.auth()), 10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "the call ended without its request message"


async def test_unary_calls_keep_their_type_in_the_metrics(harness: Harness) -> None:
    # Read as request streams inside the gateway, they are still unary to callers and dashboards.
    await harness.stub.Send(REQUEST, metadata=harness.auth())
    await health_check(harness, "")
    registry = harness.gateway.registry
    methods = (("canvas_gateway.v1.CanvasGatewayService", "Send"), ("grpc.health.v1.Health", "Check"))
    for service, method in methods:
        labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}
        assert registry.get_sample_value("grpc_server_started_total", labels) == 1
        assert registry.get_sample_value("grpc_server_msg_received_total", labels) == 1
