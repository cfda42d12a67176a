"""A send spread over several connections (`CanvasGatewayClient(connections=N)`, the CLI's
`--connections N`), against real gateways on 127.0.0.1 and the fake Braze: a part on each
connection, every position's result once, in position order when asked, the summary of one
send; under an idempotency key a resend with another N (1 against many, on one worker and on a
gateway of 2 workers) sends nobody twice, as the parts do not depend on N."""

from __future__ import annotations

import functools
import io
import json
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from canvas_gateway_client import CanvasGatewayClient, pb, spreading
from canvas_gateway_client import client as client_module
from canvas_gateway_client.cli import run
from canvas_gateway_client.errors import SentAsOneStream
from canvas_gateway_client.spreading import PART_SIZE, part_key
from fake_braze import FakeBraze
from servers import start_replica, streams_handled
from support import (
    FAKE_URLS,
    TOKENS,
    Harness,
    check_sent_once,
    idle,
    sent_to,
    tenants_toml,
    until,
)

TOKEN = TOKENS["acme"]
HEADER = {"canvas_id": "c", "context": {"campaign": "spread"}}
COUNT = 2 * PART_SIZE + 345
"""Three parts: two whole, one of 345."""
KEY_TEXT = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def users(count: int) -> list[pb.Recipient]:
    """Recipients u0 ... u<count-1>: a user's name is its position."""
    return [pb.Recipient(external_user_id=f"u{i}") for i in range(count)]


def each_position_once(results: list[pb.BatchResult], count: int) -> None:
    positions = Counter(p for r in results for p in r.positions)
    assert sorted(positions) == list(range(count)) and set(positions.values()) == {1}


async def send(
    client: CanvasGatewayClient,
    count: int,
    key: str | None = None,
    ordered: bool = False,
    stop_after: int = 0,
) -> tuple[list[pb.BatchResult], pb.SendSummary | None]:
    """The results (and the summary) of a send of users(count); with `stop_after`, the caller
    stops reading after that many results (the send is cut off)."""
    results: list[pb.BatchResult] = []
    summary = None
    async for response in client.send_stream(
        HEADER, users(count), idempotency_key=key, resumes=3, ordered=ordered
    ):
        if response.HasField("summary"):
            summary = response.summary
        else:
            results.append(response.result)
            if len(results) == stop_after:
                break
    return results, summary


def test_part_keys_are_the_key_then_suffixed_and_stay_valid() -> None:
    assert part_key("order-1", 0) == "order-1"
    assert part_key("order-1", 7) == "order-1.part-7"
    long = "k" * 128
    assert part_key(long, 0) == long
    derived = {part_key(long, i) for i in range(1, 50)}
    assert len(derived) == 49 and all(KEY_TEXT.match(k) for k in derived)
    assert part_key(long, 3) == part_key(long, 3) != part_key("j" * 128, 3)


def test_connections_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="connections"):
        CanvasGatewayClient("127.0.0.1:1", TOKEN, connections=0)
    assert "connections=3" in repr(CanvasGatewayClient("127.0.0.1:1", TOKEN, connections=3))
    assert "connections" not in repr(CanvasGatewayClient("127.0.0.1:1", TOKEN))


async def test_a_spread_send_takes_a_connection_a_part_and_gives_each_result_once_in_order(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="canvas_gateway_server.access")
    async with CanvasGatewayClient(harness.target, TOKEN, connections=3) as client:
        results, summary = await send(client, COUNT, ordered=True)

    each_position_once(results, COUNT)
    firsts = [r.positions[0] for r in results]
    assert firsts == sorted(firsts)  # position order
    # Part i's batch indexes start at i * PART_SIZE.
    batches = PART_SIZE // 50
    assert [r.batch_index for r in results] == [
        *range(batches),
        *range(PART_SIZE, PART_SIZE + batches),
        *range(2 * PART_SIZE, 2 * PART_SIZE + 7),
    ]
    assert summary is not None
    assert (summary.recipients, summary.recipients_sent, summary.batches) == (COUNT, COUNT, 2 * batches + 7)
    assert len(summary.request_id.split(",")) == 3
    assert sent_to(harness.fake) == Counter(f"u{i}" for i in range(COUNT))
    # A stream a part, each on a connection of its own (a worker each, behind one port).
    streams = [r for r in caplog.records if r.getMessage() == "rpc SendStream OK"]
    assert len(streams) == 3
    assert len({r.__dict__["peer"] for r in streams}) == 3


async def test_a_send_of_one_part_is_one_stream_with_the_gateways_summary(harness: Harness) -> None:
    async with CanvasGatewayClient(harness.target, TOKEN, connections=4) as client:
        results, summary = await send(client, 120, key="small-1")
        assert summary is not None and "," not in summary.request_id
        each_position_once(results, 120)
        # One request under the key itself: what any client sends, and what GetResults finds.
        kept = [r async for r in client.get_results(idempotency_key="small-1")]
    assert sum(len(r.result.positions) for r in kept if r.HasField("result")) == 120


@pytest.mark.parametrize(("first", "second"), [(1, 3), (3, 1), (2, 4)])
async def test_a_keyed_resend_with_other_connections_sends_nobody_twice(
    harness: Harness, first: int, second: int
) -> None:
    key = f"spread-{first}-{second}"
    harness.fake.faults.set_latency(0.005)
    async with CanvasGatewayClient(harness.target, TOKEN, connections=first) as client:
        await send(client, COUNT, key=key, stop_after=40)  # the caller goes away part-way
    await until(lambda: idle(harness.gateway, harness.fake))
    sent_first = len(sent_to(harness.fake))
    assert 0 < sent_first < COUNT

    async with CanvasGatewayClient(harness.target, TOKEN, connections=second) as client:
        results, summary = await send(client, COUNT, key=key)
    each_position_once(results, COUNT)
    check_sent_once(results, harness.fake)  # nobody twice; what is not SENT is UNKNOWN, replayed
    assert sum(len(r.positions) for r in results if r.replayed) >= sent_first
    assert summary is not None and summary.recipients == COUNT

    # Once more, with yet another N: everything comes back replayed, Braze is not called.
    calls = len(harness.fake.calls)
    async with CanvasGatewayClient(harness.target, TOKEN, connections=2) as client:
        again, _ = await send(client, COUNT, key=key, ordered=True)
        # The later parts' results are under their own keys.
        kept = [r async for r in client.get_results(idempotency_key=part_key(key, 2))]
    assert all(r.replayed for r in again) and len(harness.fake.calls) == calls
    assert sorted(p for r in kept if r.HasField("result") for p in r.result.positions) == list(range(345))


async def test_a_job_first_sent_as_one_stream_is_resent_as_one_stream_whatever_the_connections(
    harness: Harness,
) -> None:
    """Another client (or this one before parts) sent KEY as one stream past the first part and
    was cut off: a resend with several connections must not cut it into parts, whose later keys
    Braze was never called under (their recipients would be sent twice)."""
    key = "one-stream-first"
    harness.fake.faults.set_latency(0.005)
    trigger = pb.CanvasTrigger(canvas_id="c")
    trigger.context.update({"campaign": "spread"})  # HEADER's
    header = pb.StreamHeader(trigger=trigger, options=pb.SendOptions(idempotency_key=key))
    messages = [pb.SendStreamRequest(header=header)]
    everyone = users(COUNT)
    messages += [
        pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=everyone[i : i + 500]))
        for i in range(0, COUNT, 500)
    ]
    call = harness.stub.SendStream(iter(messages), metadata=Harness.auth())
    async for response in call:  # as a Go or TypeScript caller would, until it is killed
        if response.HasField("result") and max(response.result.positions) >= PART_SIZE + 500:
            break
    call.cancel()
    await until(lambda: idle(harness.gateway, harness.fake))
    sent_first = len(sent_to(harness.fake))
    assert PART_SIZE < sent_first < COUNT

    async with CanvasGatewayClient(harness.target, TOKEN, connections=3) as client:
        results, summary = await send(client, COUNT, key=key)
    each_position_once(results, COUNT)
    check_sent_once(results, harness.fake)
    assert sum(len(r.positions) for r in results if r.replayed) >= sent_first
    assert summary is not None and summary.recipients == COUNT
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # no part was sent under a key of its own
        await anext(
            aiter(CanvasGatewayClient(harness.target, TOKEN).get_results(idempotency_key=part_key(key, 1)))
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_send_that_could_not_ask_first_stops_before_a_later_part_of_a_one_stream_key(
    harness: Harness,
) -> None:
    """When the gateway did not answer the question up front, it is asked again before part 1:
    a key first sent as one stream past 5,000 stops the send after part 0 (whose batches are the
    one stream's first 100, replayed), with nothing sent under a part's key."""
    key = "asked-late"
    trigger = pb.CanvasTrigger(canvas_id="c")
    trigger.context.update({"campaign": "spread"})  # HEADER's
    header = pb.StreamHeader(trigger=trigger, options=pb.SendOptions(idempotency_key=key))
    everyone = users(PART_SIZE + 100)
    messages = [pb.SendStreamRequest(header=header)]
    messages += [
        pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=everyone[i : i + 500]))
        for i in range(0, len(everyone), 500)
    ]
    async for _ in harness.stub.SendStream(iter(messages), metadata=Harness.auth()):
        pass  # another client's one stream, whole
    calls = len(harness.fake.calls)

    async with CanvasGatewayClient(harness.target, TOKEN, connections=2) as client:
        later = functools.partial(client._refuse_one_stream, key, None)  # what `send_stream` awaits then
        one = client_module._OneStream(client, 500, False, 0, 1.0, None)
        found: list[pb.BatchResult] = []
        with pytest.raises(SentAsOneStream, match="resent as one stream"):
            async for tracked in spreading.spread(one, 2, trigger, everyone, key, None, True, later):
                if tracked.response.HasField("result"):
                    found.append(tracked.response.result)
    assert len(harness.fake.calls) == calls  # part 0 replayed, part 1 never sent
    assert all(r.replayed for r in found) and len(found) == PART_SIZE // 50


async def test_input_that_fails_in_a_later_part_sends_what_came_before_then_raises(harness: Harness) -> None:
    def broken() -> Iterator[pb.Recipient]:
        yield from users(PART_SIZE + 600)
        raise OSError("the disk went away")

    results: list[pb.BatchResult] = []
    summary = None
    async with CanvasGatewayClient(harness.target, TOKEN, connections=2) as client:
        with pytest.raises(OSError, match="disk"):
            async for response in client.send_stream(HEADER, broken(), ordered=True):
                if response.HasField("summary"):
                    summary = response.summary
                else:
                    results.append(response.result)
    each_position_once(results, PART_SIZE + 600)
    assert summary is not None and summary.recipients_sent == PART_SIZE + 600


async def test_a_part_that_fails_stops_the_send_with_its_error(harness: Harness) -> None:
    async with CanvasGatewayClient(harness.target, "not-a-known-token", connections=3) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await send(client, COUNT, ordered=True)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not harness.fake.calls


async def test_the_cli_spreads_in_position_order_and_a_resend_with_one_connection_is_replayed(
    harness: Harness, tmp_path: Path
) -> None:
    header = tmp_path / "header.json"
    header.write_text(json.dumps(HEADER))
    recipients = tmp_path / "recipients.jsonl"
    recipients.write_text("".join(json.dumps({"external_user_id": f"u{i}"}) + "\n" for i in range(COUNT)))
    out = tmp_path / "results.jsonl"

    async def cli(*argv: str) -> tuple[int, str]:
        stdout = io.StringIO()
        code = await run(
            ["--target", harness.target, *argv],
            environ={"CANVAS_GATEWAY_TOKEN": TOKEN},
            stdout=stdout,
            stderr=io.StringIO(),
        )
        return code, stdout.getvalue()

    stream = ["send-stream", "--header", str(header), "--recipients", str(recipients), "--no-progress"]
    code, _ = await cli(*stream, "--connections", "3", "--idempotency-key", "cli-1", "--results", str(out))
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["position"] for row in rows] == list(range(COUNT))  # one stream's rows, in order
    assert [row["line"] for row in rows] == list(range(1, COUNT + 1))
    assert {row["outcome"] for row in rows} == {"SENT"}
    calls = len(harness.fake.calls)

    code, printed = await cli(*stream, "--connections", "1", "--idempotency-key", "cli-1")
    assert code == 0 and len(harness.fake.calls) == calls
    lines = [json.loads(line) for line in printed.splitlines()]
    assert all(line["result"]["replayed"] for line in lines[:-1])
    assert lines[-1]["summary"]["recipients"] == COUNT

    # `results` reads every part back (KEY, then KEY.part-1, ...), in the send's positions and batches.
    back = tmp_path / "back.jsonl"
    code, printed = await cli("results", "--idempotency-key", "cli-1", "--results", str(back))
    assert code == 0 and len(harness.fake.calls) == calls
    kept = sorted(
        (row["position"], row["batch"], row["outcome"])
        for row in map(json.loads, back.read_text().splitlines())
    )
    assert kept == [(row["position"], row["batch"], row["outcome"]) for row in rows]
    assert json.loads(printed.splitlines()[-1])["summary"]["recipients"] == COUNT


# --- a gateway of 2 workers ------------------------------------------------------------------------


@pytest.fixture
async def two_workers(fake: FakeBraze, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml(FAKE_URLS[id(fake)]))
    async with aiohttp.ClientSession() as session:
        replica = await start_replica(tenants, session, CGW_WORKERS="2", CGW_SHUTDOWN_DELAY_SECONDS="0")
    try:
        yield replica.address, replica.admin
    finally:
        if replica.process.returncode is None:
            replica.process.kill()
            await replica.process.wait()


async def test_on_two_workers_a_keyed_resend_with_one_connection_sends_nobody_twice(
    two_workers: tuple[str, str], fake: FakeBraze
) -> None:
    address, admin = two_workers
    async with CanvasGatewayClient(address, TOKEN, connections=4) as client:
        first, _ = await send(client, COUNT, key="workers-1")
    each_position_once(first, COUNT)
    assert sent_to(fake) == Counter(f"u{i}" for i in range(COUNT))
    calls = len(fake.calls)

    async with CanvasGatewayClient(address, TOKEN) as client:  # one connection: one worker
        results, summary = await send(client, COUNT, key="workers-1")
    each_position_once(results, COUNT)
    assert all(r.replayed for r in results)  # the workers share the keys (the host's file)
    assert len(fake.calls) == calls
    assert summary is not None and summary.recipients == COUNT
    assert await streams_handled(admin) >= 6  # 3 parts, twice
