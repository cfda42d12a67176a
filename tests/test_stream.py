"""SendStream end to end: bulk recipients in chunks, per-recipient rejections, protocol errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from support import KEYS, Cutter, Harness, idle, trigger_from_json, until, violations_of

CANVAS = "3d46f207-f0f3-499c-8285-ea987998f700"
HEADER = {"canvas_id": CANVAS, "context": {"campaign": "spring", "n": 3}}


def header(body: dict[str, Any] = HEADER, validate_only: bool = False) -> pb.SendStreamRequest:
    return pb.SendStreamRequest(
        header=pb.StreamHeader(
            trigger=trigger_from_json(body), options=pb.SendOptions(validate_only=validate_only)
        )
    )


def chunk(recipients: Iterable[dict[str, Any]]) -> pb.SendStreamRequest:
    return pb.SendStreamRequest(
        chunk=pb.RecipientChunk(
            recipients=trigger_from_json({"canvas_id": "x", "recipients": list(recipients)}).recipients
        )
    )


def people(start: int, stop: int, invalid_every: int = 0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(start, stop):
        if invalid_every and i % invalid_every == 0:
            out.append({"email": f"person{i}@example.com"})  # no prioritization: invalid
        else:
            out.append({"external_user_id": f"user-{i}", "context": {"i": i}})
    return out


def chunks(total: int, size: int, invalid_every: int = 0) -> list[pb.SendStreamRequest]:
    return [chunk(people(i, min(i + size, total), invalid_every)) for i in range(0, total, size)]


async def requests(messages: Sequence[pb.SendStreamRequest]) -> AsyncIterator[pb.SendStreamRequest]:
    for message in messages:
        yield message


async def stream(
    h: Harness, messages: Sequence[pb.SendStreamRequest], tenant: str = "acme"
) -> tuple[list[pb.BatchResult], pb.SendSummary | None]:
    results: list[pb.BatchResult] = []
    summary = None
    async for response in h.stub.SendStream(requests(messages), metadata=h.auth(tenant), timeout=120):
        if response.HasField("result"):
            results.append(response.result)
        elif response.HasField("summary"):  # a message with no part is skipped
            summary = response.summary
    return results, summary


def covered(results: Iterable[pb.BatchResult]) -> list[int]:
    return sorted(p for r in results for p in r.positions)


async def test_ten_thousand_recipients_in_chunks(harness: Harness) -> None:
    results, summary = await stream(harness, [header(), *chunks(10_000, 500)])
    assert len(results) == 200
    assert covered(results) == list(range(10_000))  # each position exactly once
    assert sorted(r.batch_index for r in results) == list(range(200))
    assert all(
        r.outcome == pb.OUTCOME_SENT and len(r.positions) == 50 and r.braze.dispatch_id for r in results
    )
    assert summary is not None and summary.recipients_sent == 10_000 and summary.batches == 200
    calls = harness.fake.calls
    assert len(calls) == 200 and all(c.api_key == KEYS["acme"] for c in calls)
    by_dispatch = {c.dispatch_id: c.body for c in calls}
    for result in results[:20]:
        body = by_dispatch[result.braze.dispatch_id]
        assert body["context"] == HEADER["context"]
        assert [r["external_user_id"] for r in body["recipients"]] == [f"user-{p}" for p in result.positions]


async def test_invalid_recipients_are_rejected_alone_and_the_rest_goes_on(harness: Harness) -> None:
    results, summary = await stream(harness, [header(), *chunks(10_000, 400, invalid_every=37)])
    invalid = [p for p in range(10_000) if p % 37 == 0]
    rejected = [r for r in results if r.outcome == pb.OUTCOME_REJECTED]
    sent = [r for r in results if r.outcome == pb.OUTCOME_SENT]
    assert covered(results) == list(range(10_000))
    assert sorted(p for r in rejected for p in r.positions) == invalid
    for result in rejected:
        (position,) = result.positions
        assert [v.field for v in result.violations] == [f"recipients[{position}].prioritization"]
        assert result.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and result.attempts == 0
    valid = 10_000 - len(invalid)
    assert len(sent) == -(-valid // 50) and len(results) == len(sent) + len(invalid)
    assert sum(len(c.body["recipients"]) for c in harness.fake.calls) == valid
    assert (
        summary is not None
        and summary.recipients_rejected == len(invalid)
        and summary.recipients_sent == valid
    )
    assert sorted(r.batch_index for r in results) == list(range(len(results)))


async def test_header_recipients_come_first(harness: Harness) -> None:
    body = {**HEADER, "recipients": people(0, 30)}
    results, _ = await stream(harness, [header(body), chunk(people(30, 75))])
    assert sorted(len(r.positions) for r in results) == [25, 50]
    first = next(r for r in results if 0 in r.positions)
    assert list(first.positions) == list(range(50))


async def test_invalid_header_aborts_before_anything_is_sent(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream(harness, [header({"canvas_id": "", "context": {}}), *chunks(100, 50)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations_of(caught.value)] == ["canvas_id"]
    assert harness.fake.calls == []


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([chunk(people(0, 3))], "header"),
        ([], "header"),
        ([header({**HEADER, "broadcast": True})], "broadcast"),
        ([header()], "recipients"),
    ],
)
async def test_malformed_streams_are_refused(
    harness: Harness, messages: list[pb.SendStreamRequest], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream(harness, messages, tenant="globex")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations_of(caught.value)] == [field]
    assert harness.fake.calls == []


async def test_a_second_header_ends_the_stream_but_loses_no_result(harness: Harness) -> None:
    got: list[pb.BatchResult] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in harness.stub.SendStream(
            requests([header(), chunk(people(0, 120)), header(), chunk(people(120, 200))]),
            metadata=harness.auth(),
        ):
            got.append(response.result)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert covered(got) == list(range(120))  # 100 sent, the open batch of 20 reported unsent
    unsent = [r for r in got if r.outcome == pb.OUTCOME_NOT_ATTEMPTED]
    assert [list(r.positions) for r in unsent] == [list(range(100, 120))]
    assert unsent[0].retryable and unsent[0].code == grpc.StatusCode.ABORTED.value[0]
    assert sum(len(c.body["recipients"]) for c in harness.fake.calls) == 100


async def test_validate_only_stream_sends_nothing(harness: Harness) -> None:
    results, summary = await stream(
        harness, [header(validate_only=True), *chunks(1_000, 300, invalid_every=100)]
    )
    assert harness.fake.calls == []
    assert covered(results) == list(range(1_000))
    assert {r.outcome for r in results} == {pb.OUTCOME_NOT_ATTEMPTED, pb.OUTCOME_REJECTED}
    assert (
        summary is not None and summary.recipients_rejected == 10 and summary.recipients_not_attempted == 990
    )


async def test_unknown_token_is_refused(harness: Harness) -> None:
    call = harness.stub.SendStream(
        requests([header(), chunk(people(0, 5))]), metadata=(("authorization", "Bearer x"),)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert harness.fake.calls == []


async def test_a_cancelled_stream_leaves_the_gateway_healthy(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.fake.faults.set_latency(0.3)
    call = harness.stub.SendStream(requests([header(), *chunks(2_000, 500)]), metadata=harness.auth())
    async with asyncio.timeout(10):
        while harness.fake.in_progress < 1:  # batches are at the fake Braze now
            await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call.read()
    acme = {"tenant": "acme"}
    async with asyncio.timeout(10):  # until every cancelled batch has ended, leaving its trace
        while harness.gateway.registry.get_sample_value("canvas_gateway_batches_in_flight", acme) != 0:
            await asyncio.sleep(0.01)
    # The caller can no longer be told; the gateway leaves a trace of each call under way.
    assert "cancelled with its caller while calling Braze: outcome unknown" in caplog.text
    harness.fake.faults.clear()
    results, summary = await stream(harness, [header(), *chunks(100, 100)])
    assert covered(results) == list(range(100)) and summary is not None


async def test_a_violation_names_the_context_field_the_caller_used(harness: Harness) -> None:
    bad_legacy = {"external_user_id": "u0", "canvas_entry_properties": {"blob": "x" * 60_000}}  # too big
    rest = [{"external_user_id": f"u{i}", "canvas_entry_properties": {"i": i}} for i in range(1, 4)]
    results, _ = await stream(harness, [header({"canvas_id": CANVAS}), chunk([bad_legacy, *rest])])
    rejected = [r for r in results if r.outcome == pb.OUTCOME_REJECTED]
    assert [list(r.positions) for r in rejected] == [[0]]
    assert [v.field for v in rejected[0].violations] == ["recipients[0].canvas_entry_properties"]
    assert sum(len(r.positions) for r in results if r.outcome == pb.OUTCOME_SENT) == 3
    (call,) = harness.fake.calls  # the accepted ones went out under the tenant's name, `context`
    assert [r["context"] for r in call.body["recipients"]] == [{"i": 1}, {"i": 2}, {"i": 3}]


async def test_a_caller_cut_off_mid_stream_gets_no_partial_last_batch_sent(harness: Harness) -> None:
    """grpcio ends a stream's requests alike when the caller half-closes and when its connection is
    lost; the gateway must not then send its open batch, cut short, for a caller who is gone."""
    opened = asyncio.Event()

    async def requests() -> AsyncIterator[pb.SendStreamRequest]:
        yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c")))
        for start in range(0, 70 * 200, 70):  # still sending when the connection goes
            users = [pb.Recipient(external_user_id=f"u{i}") for i in range(start, start + 70)]
            yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=users))
            await asyncio.sleep(0.002)
        await opened.wait()  # never half-closes

    async with (
        Cutter(harness.gateway.port) as cutter,
        grpc.aio.insecure_channel(f"127.0.0.1:{cutter.port}") as channel,
    ):
        call = pb_grpc.CanvasGatewayServiceStub(channel).SendStream(requests(), metadata=harness.auth())
        first = await call.read()
        assert isinstance(first, pb.SendStreamResponse) and first.result.outcome == pb.OUTCOME_SENT
        cutter.cut()
        await until(lambda: idle(harness.gateway, harness.fake))  # the gateway has ended the stream
        opened.set()
    assert {len(c.body["recipients"]) for c in harness.fake.calls} == {50}
