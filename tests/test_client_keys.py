"""The Python client and the CLI with idempotency keys, against real gateways on 127.0.0.1 and the
fake Braze: a keyed stream that a gateway ends (a drain, a lost connection) is sent again from
position 0 under its key, each batch's result is yielded once and nobody gets the Canvas twice; a
batch another call is sending is tried again after its RetryInfo delay; the CLI run twice with a
key sends nothing the second time; recipients that can be read only once are not resumed."""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from canvas_gateway_client import CanvasGatewayClient, KeyForgotten, pb, resume_position
from canvas_gateway_client.cli import run
from canvas_gateway_client.keyed import _Keyed
from canvas_gateway_client.tracking import MAX_HELD_RESULTS, _Stream
from canvas_gateway_server.app import Gateway
from canvas_gateway_server.settings import Settings
from fake_braze import FakeBraze, Fault
from servers import RedisServer, redis_server
from support import (
    FAKE_URLS,
    LOCAL,
    TOKENS,
    Cutter,
    Harness,
    check_sent_once,
    free_port,
    idle,
    sent_to,
    start_gateway,
    tenants_toml,
    until,
)

TOKEN = TOKENS["acme"]
HEADER = {"canvas_id": "c", "context": {"campaign": "keys"}}


def users(count: int) -> list[dict[str, Any]]:
    """Recipients u0 ... u<count-1>, each with its position in its context."""
    return [{"external_user_id": f"u{i}", "context": {"n": i}} for i in range(count)]


def check_each_batch_once(results: list[pb.BatchResult], count: int) -> None:
    """Every position has exactly one result, each batch index one, and (as every stream sent
    the whole sequence from position 0) batch i holds positions 50i ... 50i + 49."""
    positions = Counter(p for r in results for p in r.positions)
    assert sorted(positions) == list(range(count)) and set(positions.values()) == {1}
    assert len({r.batch_index for r in results}) == len(results) == -(-count // 50)
    for result in results:
        start = 50 * result.batch_index
        assert list(result.positions) == list(range(start, min(start + 50, count)))


def kept_replayed(gateway: Gateway) -> float:
    """Batches this gateway answered with a result kept under their key."""
    value = gateway.registry.get_sample_value(
        "canvas_gateway_idempotency_total", {"tenant": "acme", "verdict": "kept"}
    )
    return value or 0.0


def settings_on_a_port(fake: FakeBraze, tmp_path: Path, **overrides: Any) -> Settings:
    """A gateway on a port of its own, so that one started after it takes the same port."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    return Settings.from_env(
        {},
        grpc_address=f"127.0.0.1:{free_port()}",
        tenants_file=str(tenants),
        retry_base_delay_seconds=0.01,
        idempotency_file=str(tmp_path / "keys.sqlite3"),  # without Redis: the host's file
        **{**LOCAL, **overrides},
    )


class Gated:
    """`users(count)`, read afresh on each call, that wait at `gate_at` until `gate` is set: a
    source that is still being read when the gateway drains."""

    def __init__(self, count: int, gate_at: int) -> None:
        self.count, self.gate_at = count, gate_at
        self.gate = asyncio.Event()
        self.reads = 0

    async def __call__(self) -> AsyncIterator[dict[str, Any]]:
        self.reads += 1
        for i, user in enumerate(users(self.count)):
            if i == self.gate_at:
                await self.gate.wait()
            yield user


async def drain(gateway: Gateway, source: Gated) -> None:
    """Stop `gateway` while it waits for `source`: once it reads no more, the source goes on, so
    that the caller ends its writes (which the gateway drops, then ends the stream)."""
    stopping = asyncio.create_task(gateway.stop(grace=5))
    await until(gateway.shutting_down.is_set)
    await asyncio.sleep(0.2)
    source.gate.set()
    await stopping


@pytest.fixture
async def redis() -> AsyncIterator[RedisServer]:
    async with redis_server() as server:
        yield server


# --- (a) a drain: the stream goes on in another gateway, from position 0, with its key ------------


async def test_a_drained_keyed_stream_is_sent_again_from_the_start_and_nobody_gets_it_twice(
    fake: FakeBraze, tmp_path: Path, redis: RedisServer
) -> None:
    count = 3_000
    settings = settings_on_a_port(fake, tmp_path, redis_url=redis.url)  # both gateways keep keys there
    fake.faults.set_latency(0.02)
    source = Gated(count, gate_at=1_030)  # chunks of 70: the first gateway reads 980 at most
    first = await start_gateway(settings)
    second: Gateway | None = None
    responses: list[pb.SendStreamResponse] = []
    async with CanvasGatewayClient(settings.listen.grpc_address, TOKEN) as client:

        async def consume() -> None:
            stream = client.send_stream(HEADER, source, chunk_size=70, resumes=3, idempotency_key="drain-1")
            async for response in stream:
                responses.append(response)

        consuming = asyncio.create_task(consume())
        try:
            await until(lambda: len(fake.calls) >= 10)
            await drain(first, source)  # finishes its batches, ends the stream UNAVAILABLE
            sent_by_first = len(fake.sent())
            second = await start_gateway(settings)
            async with asyncio.timeout(30):
                await consuming
            replayed = kept_replayed(second)
        finally:
            consuming.cancel()
            if second is not None:
                await second.stop(grace=0)

    assert 10 <= sent_by_first <= 19  # the first gateway sent part: the rest needed the resume
    assert source.reads == 1  # read once: the client holds part 0 and sends it again from the first
    *results, last = responses
    batches = [r.result for r in results]
    check_each_batch_once(batches, count)
    # The resumed stream carried the first gateway's batches again (from position 0, same bodies,
    # same key): the second gateway replayed each, and the client dropped them all (it had yielded
    # their results from the first stream).
    assert replayed >= sent_by_first
    assert not any(b.replayed for b in batches)
    assert {b.outcome for b in batches} == {pb.OUTCOME_SENT}
    check_sent_once(batches, fake)
    assert len(sent_to(fake)) == count
    for batch in batches:  # position i is u<i>, in the call that sent it
        call = next(c for c in fake.calls if c.dispatch_id == batch.braze.dispatch_id)
        assert [r["context"]["n"] for r in call.body["recipients"]] == list(batch.positions)
    summary = last.summary  # each batch counted once
    assert (summary.recipients, summary.recipients_sent, summary.batches) == (count, count, count // 50)
    assert len(summary.request_id.split(",")) == 2


# --- a lost connection: the CLI reads its file again from the start ------------------------------


async def cli(target: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run(
        ["--target", target, "--timeout", "30", *argv],
        environ={"CANVAS_GATEWAY_TOKEN": TOKEN},
        stdin=io.StringIO(""),
        stdout=out,
        stderr=err,
    )
    assert TOKEN not in out.getvalue() + err.getvalue()
    return code, out.getvalue(), err.getvalue()


def write_files(tmp_path: Path, count: int, bad_line: int | None = None) -> tuple[str, str]:
    """A header file, and a JSON Lines file of `users(count)` (with a broken line at `bad_line`)."""
    header = tmp_path / "header.json"
    header.write_text(json.dumps(HEADER))
    lines = [json.dumps(user) for user in users(count)]
    if bad_line is not None:
        lines.insert(bad_line - 1, '{"external_user_id": ')
    recipients = tmp_path / "recipients.jsonl"
    recipients.write_text("\n".join(lines) + "\n")
    return str(header), str(recipients)


def printed(out: str) -> tuple[list[pb.BatchResult], dict[str, Any]]:
    """The results and the summary the CLI printed."""
    *results, summary = [json.loads(line) for line in out.splitlines()]
    return [_result(line["result"]) for line in results], summary["summary"]


def _result(data: dict[str, Any]) -> pb.BatchResult:
    result = pb.BatchResult(
        batch_index=data["batch_index"],
        positions=data["positions"],
        outcome=pb.Outcome.Value(data["outcome"]),
        replayed=data["replayed"],
    )
    result.braze.dispatch_id = data.get("braze", {}).get("dispatch_id", "")  # no braze: no reply
    return result


async def test_the_cli_sends_its_file_again_from_the_start_after_a_lost_connection(
    harness: Harness, tmp_path: Path
) -> None:
    count = 2_000
    header, recipients = write_files(tmp_path, count, bad_line=101)  # a bad row, skipped
    results_file = tmp_path / "results.jsonl"
    harness.fake.faults.set_latency(0.05)
    async with Cutter(harness.gateway.port) as cutter:
        sending = asyncio.create_task(
            cli(
                f"127.0.0.1:{cutter.port}",
                *("send-stream", "--header", header, "--recipients", recipients, "--no-progress"),
                *("--chunk-size", "100", "--max-bad-rows", "1", "--results", str(results_file)),
                *("--idempotency-key", "cli-cut-1"),
            )
        )
        await until(lambda: len(harness.fake.calls) >= 8 and harness.fake.in_progress > 0)
        cutter.cut()  # the caller's connection is lost mid-stream: UNAVAILABLE, not a drain
        sent_before = len(harness.fake.sent())
        code, out, err = await asyncio.wait_for(sending, 30)

    assert sent_before < count // 50
    assert '"summary"' in out.splitlines()[-1], err
    results, summary = printed(out)
    check_each_batch_once(results, count)
    check_sent_once(results, harness.fake)  # the batches cut off mid-call: UNKNOWN, never sent again
    unknown = {f"u{p}" for r in results if r.outcome == pb.OUTCOME_UNKNOWN for p in r.positions}
    assert set(sent_to(harness.fake)) | unknown == {f"u{i}" for i in range(count)}  # nobody left out
    assert code == 2, err  # the bad row
    assert (summary["recipients"], summary["batches"]) == (count, count // 50)
    assert len(summary["request_id"].split(",")) >= 2  # resumed
    assert err.count("recipients.jsonl:101:") == 1  # the file was read twice, its bad row reported once
    rows = [json.loads(line) for line in results_file.read_text().splitlines()]
    assert len(rows) == count + 1
    good = [row for row in rows if row["outcome"] != "INVALID_INPUT"]
    assert all(row["line"] == row["position"] + 1 + (row["position"] >= 100) for row in good)


# --- (b) the CLI run twice with a key --------------------------------------------------------------


async def test_the_cli_run_again_with_its_key_sends_nothing_and_prints_replayed_results(
    harness: Harness, tmp_path: Path
) -> None:
    count = 260
    header, recipients = write_files(tmp_path, count)
    command = ("send-stream", "--header", header, "--recipients", recipients, "--no-progress")
    key = ("--idempotency-key", "order-2026-11-29.a")

    code, out, _ = await cli(harness.target, *command, *key)
    assert code == 0
    first, _ = printed(out)
    calls = len(harness.fake.calls)
    assert calls == 6 and not any(r.replayed for r in first)

    code, out, err = await cli(harness.target, *command, *key)
    assert code == 0, err
    assert len(harness.fake.calls) == calls  # nothing sent
    again, summary = printed(out)
    assert sorted(r.batch_index for r in again) == list(range(6))
    assert all(r.replayed and r.outcome == pb.OUTCOME_SENT for r in again)
    dispatched = {r.batch_index: r.braze.dispatch_id for r in first}
    assert {r.batch_index: r.braze.dispatch_id for r in again} == dispatched
    assert summary["recipients_sent"] == count
    assert (  # what was sent earlier apart from what was sent now
        "  replayed: 260 recipients in 6 batches had their result from an earlier run under this "
        "idempotency key (sent 260): Braze was not called for them; sent now: 0\n"
    ) in err

    code, out, _ = await cli(harness.target, *command)  # without the key: sent again
    assert code == 0 and len(harness.fake.calls) == 2 * calls

    body = tmp_path / "body.json"
    body.write_text(json.dumps({**HEADER, "recipients": users(60)}))
    for _ in range(2):
        code, out, _ = await cli(harness.target, "send", "--file", str(body), "--idempotency-key", "u-1")
        assert code == 0
    assert [r.replayed for r in printed(out)[0]] == [True, True]
    assert len(harness.fake.calls) == 2 * calls + 2


# --- (c) recipients read once are not resumed with a key --------------------------------------------


async def test_a_one_shot_iterator_with_a_key_is_not_resumed(fake: FakeBraze, tmp_path: Path) -> None:
    settings = settings_on_a_port(fake, tmp_path)
    fake.faults.set_latency(0.05)
    first = await start_gateway(settings)
    second: Gateway | None = None
    results: list[pb.BatchResult] = []

    source = Gated(3_000, gate_at=1_030)

    async with CanvasGatewayClient(settings.listen.grpc_address, TOKEN) as client:

        async def consume() -> None:
            once = source()  # an async generator: read once
            stream = client.send_stream(HEADER, once, chunk_size=70, resumes=3, idempotency_key="once-1")
            async for response in stream:
                results.append(response.result)

        consuming = asyncio.create_task(consume())
        try:
            await until(lambda: len(fake.calls) >= 10)
            await drain(first, source)
            second = await start_gateway(settings)  # a resume would find it
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async with asyncio.timeout(30):
                    await consuming
            calls = len(fake.calls)
            await asyncio.sleep(0.5)  # longer than a resume's first pause
        finally:
            consuming.cancel()
            if second is not None:
                await second.stop(grace=0)

    assert len(fake.calls) == calls  # nothing more was sent
    position = resume_position(caught.value)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and position is not None
    assert sorted(p for r in results for p in r.positions) == list(range(position))  # none held back


# --- a batch another call is sending ------------------------------------------------------------------


async def test_a_batch_another_call_is_sending_is_tried_again_after_its_retry_delay(
    harness: Harness,
) -> None:
    harness.fake.faults.script([Fault.delay(1.0)])  # the first call's batch answers after a second
    recipients = users(50)
    async with CanvasGatewayClient(harness.target, TOKEN) as client:

        async def send() -> list[pb.SendStreamResponse]:
            stream = client.send_stream(HEADER, recipients, resumes=2, idempotency_key="busy-1")
            return [response async for response in stream]

        elsewhere = asyncio.create_task(send())
        await until(lambda: harness.fake.in_progress == 1)
        started = asyncio.get_running_loop().time()
        *results, last = await send()  # its batch is in flight in the other call: ABORTED
        waited = asyncio.get_running_loop().time() - started
        first = await elsewhere

    [result] = [r.result for r in results]
    assert (result.outcome, result.replayed) == (pb.OUTCOME_SENT, True)  # kept by the other call
    assert result.braze.dispatch_id == first[0].result.braze.dispatch_id
    assert len(harness.fake.calls) == 1
    assert waited >= 1.0  # the RetryInfo delay
    assert (last.summary.batches, last.summary.recipients_sent) == (1, 50)
    assert len(last.summary.request_id.split(",")) == 2


async def test_the_unary_send_takes_a_key(harness: Harness) -> None:
    async with CanvasGatewayClient(harness.target, TOKEN) as client:
        body = {**HEADER, "recipients": users(70)}
        first = await client.send(body, idempotency_key="unary-1")
        again = await client.send(body, idempotency_key="unary-1")
    assert [r.replayed for r in first.results] == [False, False]
    assert [r.replayed for r in again.results] == [True, True]
    assert len(harness.fake.calls) == 2


# --- what a keyed send yields, batch by batch ---------------------------------------------------------


def test_a_batch_yielded_early_as_not_attempted_gets_its_later_result_and_is_counted_once() -> None:
    """Held back past MAX_HELD_RESULTS, the oldest retryable NOT_ATTEMPTED is yielded early; if a
    resumed stream then sends its batch, that result follows (the one batch yielded twice) and
    the summary counts it once, by its last result. A result that stands is never yielded again."""
    state = _Keyed(limit=1)

    def result(index: int, outcome: pb.Outcome.ValueType, replayed: bool = False) -> pb.BatchResult:
        retryable = outcome == pb.OUTCOME_NOT_ATTEMPTED
        return pb.BatchResult(
            batch_index=index, positions=[index], outcome=outcome, retryable=retryable, replayed=replayed
        )

    def take(*results: pb.BatchResult) -> list[tuple[int, int]]:
        stream = _Stream(0)
        yielded: list[tuple[int, int]] = []
        for each in results:
            stream.track([(each.positions[0], pb.Recipient(external_user_id=f"u{each.positions[0]}"))])
            yielded += [
                (t.response.result.batch_index, t.response.result.outcome) for t in state.take(stream, each)
            ]
        return yielded

    held = MAX_HELD_RESULTS + 1
    first = take(
        result(0, pb.OUTCOME_SENT), *(result(i, pb.OUTCOME_NOT_ATTEMPTED) for i in range(1, held + 1))
    )
    assert first == [(0, pb.OUTCOME_SENT), (1, pb.OUTCOME_NOT_ATTEMPTED)]  # the oldest of those held
    state.resumes = 1
    again = take(
        result(0, pb.OUTCOME_SENT, replayed=True),  # stands: dropped
        result(1, pb.OUTCOME_SENT),  # yielded early as NOT_ATTEMPTED, sent now: follows
        result(2, pb.OUTCOME_SENT),  # held: its result, once
        *(result(i, pb.OUTCOME_NOT_ATTEMPTED) for i in range(3, held + 1)),  # no resume left: as is
    )
    assert again == [(1, pb.OUTCOME_SENT), (2, pb.OUTCOME_SENT)] + [
        (i, pb.OUTCOME_NOT_ATTEMPTED) for i in range(3, held + 1)
    ]
    assert list(state.release()) == []
    summary = state.summary(None).response.summary
    assert (summary.batches, summary.recipients, summary.recipients_sent) == (held + 1, held + 1, 3)
    assert summary.recipients_not_attempted == held - 2


def test_a_refusal_braze_gave_does_not_stand_so_its_later_send_is_no_forgotten_key() -> None:
    """A REJECTED batch (a 401 for a wrong key: nothing sent) is not kept by the gateway: once the
    key is fixed a resumed stream sends it, and that SENT result follows the refusal instead of
    being taken for a key the gateway forgot."""
    state = _Keyed(limit=1)

    def take(result: pb.BatchResult) -> list[pb.Outcome.ValueType]:
        stream = _Stream(0)
        stream.track([(0, pb.Recipient(external_user_id="u0"))])
        return [t.response.result.outcome for t in state.take(stream, result)]

    refused = pb.BatchResult(batch_index=0, positions=[0], outcome=pb.OUTCOME_REJECTED, retryable=False)
    assert take(refused) == [pb.OUTCOME_REJECTED]
    state.resumes = 1
    assert take(pb.BatchResult(batch_index=0, positions=[0], outcome=pb.OUTCOME_SENT)) == [pb.OUTCOME_SENT]
    assert state.forgotten is None
    assert state.summary(None).response.summary.recipients_sent == 1


# --- a gateway that forgot the key -------------------------------------------------------------------


async def test_a_resume_that_finds_the_key_forgotten_stops_at_once(fake: FakeBraze, tmp_path: Path) -> None:
    """A gateway that lost its keys (without Redis, another host's, or its host's /tmp emptied by
    a reboot): the resumed stream would send every batch again. The client stops at the first
    batch that had a result and comes back sent again, and raises KeyForgotten."""
    settings = settings_on_a_port(fake, tmp_path)  # no redis_url
    fake.faults.set_latency(0.02)
    source = Gated(3_000, gate_at=1_030)
    first = await start_gateway(settings)
    second: Gateway | None = None
    results: list[pb.BatchResult] = []
    async with CanvasGatewayClient(settings.listen.grpc_address, TOKEN) as client:

        async def consume() -> None:
            stream = client.send_stream(HEADER, source, chunk_size=70, resumes=3, idempotency_key="lost-1")
            async for response in stream:
                results.append(response.result)

        consuming = asyncio.create_task(consume())
        try:
            await until(lambda: len(fake.calls) >= 10)
            await drain(first, source)
            sent_by_first = len(fake.sent())
            elsewhere = replace(settings.state, idempotency_file=str(tmp_path / "new.sqlite3"))
            second = await start_gateway(replace(settings, state=elsewhere))
            with pytest.raises(KeyForgotten):
                async with asyncio.timeout(30):
                    await consuming
            await until(lambda: idle(second, fake))  # what the cancel left in flight settles
        finally:
            consuming.cancel()
            if second is not None:
                await second.stop(grace=0)

    twice = sum(1 for times in sent_to(fake).values() if times > 1)
    assert 0 < twice <= 50 * 10  # the batches in flight when it was found out, not all of them
    assert twice < 50 * sent_by_first
    assert len({r.batch_index for r in results}) == len(results)  # still yielded once each
