"""Outcomes kept after the fact (`outcomes`, GetResults, FindRecipient): every batch's result read
back by idempotency key or request id, never calling Braze, per tenant; in this process's memory,
the host's SQLite file across a restart, and Redis shared by two gateways."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_client import CanvasGatewayClient
from canvas_gateway_client.cli import run
from canvas_gateway_server import outcomes
from canvas_gateway_server.context import RequestContext
from canvas_gateway_server.metrics import Metrics, PrometheusMetrics
from canvas_gateway_server.model import Batch, BatchResult, Code, Outcome, Rule, Violation
from canvas_gateway_server.stores.memory import LocalResults
from canvas_gateway_server.stores.redis import RedisResults, connect
from canvas_gateway_server.tenants import Tenant
from fake_braze import FakeBraze, Fault
from prometheus_client import CollectorRegistry
from servers import redis_server
from support import (
    TOKENS,
    Harness,
    gateway_of,
    idle,
    replicas_on_redis,
    send_request,
    until,
    with_request_id,
)


def users(count: int, first: int = 0) -> list[pb.Recipient]:
    return [pb.Recipient(external_user_id=f"u{first + i}") for i in range(count)]


async def get_results(
    stub: pb_grpc.CanvasGatewayServiceAsyncStub, tenant: str = "acme", **name: str
) -> tuple[list[pb.BatchResult], pb.SendSummary]:
    found, summary = [], pb.SendSummary()
    async for response in stub.GetResults(pb.GetResultsRequest(**name), metadata=Harness.auth(tenant)):
        if response.HasField("result"):
            found.append(response.result)
        else:
            summary = response.summary
    return found, summary


def positions(found: list[pb.BatchResult]) -> list[int]:
    return [position for result in found for position in result.positions]


async def test_an_unkeyed_send_is_read_back_by_request_id_without_calling_braze(harness: Harness) -> None:
    sent = await harness.stub.Send(send_request(120), metadata=with_request_id("acme", "job-y-1"))
    calls = len(harness.fake.calls)

    found, summary = await get_results(harness.stub, request_id="job-y-1")

    assert list(found) == list(sent.results)  # each as it was, in position order
    assert positions(found) == list(range(120))
    assert summary.recipients_sent == 120 and summary.batches == 3 and summary.request_id == "job-y-1"
    assert len(harness.fake.calls) == calls


async def test_find_recipient_answers_by_identifier_and_keeps_none(harness: Harness) -> None:
    sent = await harness.stub.Send(send_request(120), metadata=with_request_id("acme", "job-y-2"))
    ask = pb.FindRecipientRequest(request_id="job-y-2", recipient=pb.Recipient(external_user_id="u57"))

    answer = await harness.stub.FindRecipient(ask, metadata=harness.auth())

    assert answer.found and answer.position == 57
    assert answer.result == sent.results[1]
    missing = pb.FindRecipientRequest(request_id="job-y-2", recipient=pb.Recipient(external_user_id="u999"))
    assert not (await harness.stub.FindRecipient(missing, metadata=harness.auth())).found
    # What the store holds names no recipient: positions and salted hashes only.
    assert harness.gateway.stores is not None
    store = harness.gateway.stores.results
    assert isinstance(store, LocalResults)
    kept = await store.read("acme", outcomes.request_handle("job-y-2"))
    assert kept and not any(b"u57" in data for data in kept)


async def test_a_keyed_stream_cut_off_mid_way_is_read_back_whole(harness: Harness) -> None:
    """The caller reads one result and is gone: `GetResults` by key and by request id returns
    every position once, as it was made, and Braze is not called again."""
    header = pb.StreamHeader(
        trigger=pb.CanvasTrigger(canvas_id="c"), options=pb.SendOptions(idempotency_key="job-cut")
    )
    messages = [pb.SendStreamRequest(header=header)]
    messages += [
        pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=users(100, i))) for i in (0, 100, 200)
    ]
    call = harness.stub.SendStream(iter(messages), metadata=with_request_id("acme", "job-cut-rid"))
    first = await call.read()
    assert isinstance(first, pb.SendStreamResponse) and first.HasField("result")
    await until(lambda: len(harness.fake.calls) == 6)
    call.cancel()  # the caller is killed after reading one result
    await until(lambda: idle(harness.gateway, harness.fake))  # the last answer kept, under load too
    calls = len(harness.fake.calls)

    by_key, _ = await get_results(harness.stub, idempotency_key="job-cut")
    by_id, summary = await get_results(harness.stub, request_id="job-cut-rid")

    assert positions(by_key) == positions(by_id) == list(range(300))
    assert first.result in by_key
    assert summary.recipients_sent == 300
    assert Counter(r.braze.dispatch_id for r in by_key) == Counter(c.dispatch_id for c in harness.fake.calls)
    assert len(harness.fake.calls) == calls


async def test_a_repeat_under_a_key_keeps_the_sending_calls_results_under_the_key(harness: Harness) -> None:
    first = await harness.stub.Send(send_request(60, "job-k"), metadata=with_request_id("acme", "first"))
    again = await harness.stub.Send(send_request(60, "job-k"), metadata=with_request_id("acme", "again"))

    by_key, _ = await get_results(harness.stub, idempotency_key="job-k")
    by_again, _ = await get_results(harness.stub, request_id="again")

    assert list(by_key) == list(first.results) and not any(r.replayed for r in by_key)
    assert list(by_again) == list(again.results) and all(r.replayed for r in by_again)


async def test_an_unknown_batch_is_read_back_unknown(harness: Harness) -> None:
    harness.fake.faults.script([Fault.status(500)] * 5)
    sent = await harness.stub.Send(send_request(10), metadata=with_request_id("acme", "outage"))
    found, summary = await get_results(harness.stub, request_id="outage")
    assert [r.outcome for r in found] == [r.outcome for r in sent.results] == [pb.OUTCOME_UNKNOWN]
    assert summary.recipients_unknown == 10


async def test_a_tenant_never_reads_another_tenants_results(harness: Harness) -> None:
    await harness.stub.Send(send_request(60, "same-key"), metadata=with_request_id("acme", "same-id"))
    for name in ({"idempotency_key": "same-key"}, {"request_id": "same-id"}):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await get_results(harness.stub, "globex", **name)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    ask = pb.FindRecipientRequest(request_id="same-id", recipient=pb.Recipient(external_user_id="u1"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.stub.FindRecipient(ask, metadata=harness.auth("globex"))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND

    await harness.stub.Send(send_request(10, "same-key"), metadata=with_request_id("globex", "same-id"))
    for tenant, count in (("acme", 60), ("globex", 10)):
        for name in ({"idempotency_key": "same-key"}, {"request_id": "same-id"}):
            found, _ = await get_results(harness.stub, tenant, **name)
            assert positions(found) == list(range(count))


async def test_a_lookup_names_its_request_once_and_its_recipient(harness: Harness) -> None:
    for name in ({}, {"idempotency_key": "k", "request_id": "r"}):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await get_results(harness.stub, **name)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.stub.FindRecipient(pb.FindRecipientRequest(request_id="r"), metadata=harness.auth())
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.stub.FindRecipient(pb.FindRecipientRequest(request_id="r"), metadata=())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("settings_overrides", [{"results_kept": False}])
async def test_results_kept_off_keeps_nothing(harness: Harness) -> None:
    await harness.stub.Send(send_request(10), metadata=with_request_id("acme", "off"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await get_results(harness.stub, request_id="off")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "CGW_RESULTS_KEPT" in (refused.value.details() or "")
    assert [b async for b in harness.stub.ListUnknown(pb.ListUnknownRequest(), metadata=harness.auth())] == []


async def test_validate_only_and_rejected_recipients_are_kept_too(harness: Harness) -> None:
    header = pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c"), options=pb.SendOptions())
    chunk = pb.RecipientChunk(recipients=[*users(3), pb.Recipient(email="not-an-email")])
    messages = [pb.SendStreamRequest(header=header), pb.SendStreamRequest(chunk=chunk)]
    async for _ in harness.stub.SendStream(iter(messages), metadata=with_request_id("acme", "mixed")):
        pass
    found, _ = await get_results(harness.stub, request_id="mixed")
    assert positions(found) == [0, 1, 2, 3]
    rejected = [r for r in found if r.outcome == pb.OUTCOME_REJECTED]
    assert rejected and rejected[0].violations[0].field.endswith("email")

    request = send_request(10)
    request.options.validate_only = True
    await harness.stub.Send(request, metadata=with_request_id("acme", "planned"))
    found, summary = await get_results(harness.stub, request_id="planned")
    assert summary.recipients_not_attempted == 10


def test_a_kept_result_decodes_as_it_was() -> None:
    result = BatchResult(
        3,
        (7,),
        Outcome.REJECTED,
        Code.INVALID_ARGUMENT,
        "bad",
        violations=(Violation("recipients[7].email", "not an email", Rule.EMAIL_FORMAT),),
        errors=({"type": "x"},),
        rate_limit_reset=5,
        retry_at=1.5,
        quota="recipients",
    )
    body = b'{"canvas_id":"c","recipients":[{"user_alias":{"alias_label":"l","alias_name":"n"}}]}'
    kept = outcomes.decode(outcomes.encode(result, Batch(3, (7,), body)))
    assert kept.result == result and kept.batch is None  # a body is kept for UNKNOWN only
    assert kept.position_of("user_alias:l\x00n") == 7
    assert kept.position_of("user_alias:n\x00l") is None
    assert outcomes.decode(outcomes.encode(result)).position_of("user_alias:l\x00n") is None
    assert outcomes.identifier_text({"email": "A@B.example"}) == "email:a@b.example"
    assert outcomes.identifier_text({}) == ""


async def test_the_memory_store_honours_its_bound_and_its_ttl() -> None:
    now = [0.0]
    evicted: list[str] = []
    store = LocalResults(10.0, 4, 60.0, clock=lambda: now[0], on_evict_outcome=evicted.append)
    for request in range(4):
        for index in range(2):
            await store.record([("acme", f"request:{request}", str(index), b"x" * 10)])
    assert store.outcomes == 4 and evicted == ["acme", "acme"]
    assert await store.read("acme", "request:0") == []
    assert len(await store.read("acme", "request:3")) == 2
    assert await store.read("globex", "request:3") == []
    now[0] = 11.0
    assert await store.read("acme", "request:3") == []
    store.expire()
    assert store.outcomes == 0


async def test_redis_keeps_a_flush_of_rows_in_one_command_per_handle() -> None:
    """Rows of one flush that share a handle (a stream's batches) are one HSET and one PEXPIRE in
    Redis, not two commands a row; a later row of the same entry wins, as it would one by one."""
    async with redis_server() as server:
        client = connect(server.url, 1.0)
        try:
            store = RedisResults(client, ttl=60.0, lease=60.0)
            rows = [("acme", "request:a", str(index), b"a%d" % index) for index in range(6)]
            rows += [("acme", "key:k", "0", b"k0"), ("acme", "request:a", "2", b"again")]
            await store.record(rows)
            stats = (await client.call("INFO", "commandstats")).decode()
            assert "cmdstat_hset:calls=2," in stats and "cmdstat_pexpire:calls=2," in stats, stats
            found = sorted(await store.read("acme", "request:a"))
            assert found == sorted([b"a0", b"a1", b"again", b"a3", b"a4", b"a5"])
            assert await store.read("acme", "key:k") == [b"k0"]
            assert 0 < await client.call("PTTL", "cgw:outcome:acme/key:k") <= 60_000
        finally:
            await client.aclose()


async def test_what_is_kept_is_counted(harness: Harness) -> None:
    await harness.stub.Send(send_request(60), metadata=with_request_id("acme", "counted"))
    registry = harness.gateway.registry
    labels = {"tenant": "acme", "state": "kept"}
    await harness.gateway.dispatcher.recorder.flush()  # a Send answers before its results are written
    assert registry.get_sample_value("canvas_gateway_results_kept_total", labels) == 2
    assert (registry.get_sample_value("canvas_gateway_results_kept_bytes_total", {"tenant": "acme"}) or 0) > 0


def test_what_fails_to_be_kept_and_what_is_evicted_are_counted() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, version="t", git_commit="t")
    metrics.results_kept("acme", "failed", 10)
    metrics.results_evicted("acme")
    Metrics().results_kept("acme", "failed", 10)  # the base ignores both
    Metrics().results_evicted("acme")
    assert (
        registry.get_sample_value("canvas_gateway_results_kept_total", {"tenant": "acme", "state": "failed"})
        == 1
    )
    assert registry.get_sample_value("canvas_gateway_results_kept_bytes_total", {"tenant": "acme"}) is None
    assert registry.get_sample_value("canvas_gateway_results_evicted_total", {"tenant": "acme"}) == 1


async def test_three_gateways_on_redis_read_each_others_results(fake: FakeBraze, tmp_path: Path) -> None:
    """A request sent through one replica is read, whole and only by its tenant, through each other."""
    async with replicas_on_redis(fake, tmp_path, 3) as stubs:
        sent = await stubs[0].Send(send_request(120, "shared"), metadata=with_request_id("acme", "on-one"))
        calls = len(fake.calls)
        # A Send answers before its results are written behind (within FLUSH_SECONDS, then the
        # write): another replica reads them once that write is done.
        async with asyncio.timeout(5):
            while True:
                try:
                    await get_results(stubs[1], request_id="on-one")
                    break
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    await asyncio.sleep(outcomes.FLUSH_SECONDS / 5)
        for stub in stubs[1:]:
            for name in ({"idempotency_key": "shared"}, {"request_id": "on-one"}):
                found, _ = await get_results(stub, **name)
                assert list(found) == list(sent.results)
                with pytest.raises(grpc.aio.AioRpcError):
                    await get_results(stub, "globex", **name)
            ask = pb.FindRecipientRequest(
                idempotency_key="shared", recipient=pb.Recipient(external_user_id="u99")
            )
            answer = await stub.FindRecipient(ask, metadata=Harness.auth())
            assert answer.found and answer.position == 99
        assert len(fake.calls) == calls


async def test_results_outlive_a_restart_in_the_hosts_file(fake: FakeBraze, tmp_path: Path) -> None:
    keys = str(tmp_path / "keys.sqlite3")
    gateway = await gateway_of(fake, tmp_path, idempotency_file=keys)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = pb_grpc.CanvasGatewayServiceStub(channel)
            sent = await stub.Send(send_request(60), metadata=with_request_id("acme", "before-restart"))
    finally:
        await gateway.stop(grace=0)
    calls = len(fake.calls)
    gateway = await gateway_of(fake, tmp_path, idempotency_file=keys)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = pb_grpc.CanvasGatewayServiceStub(channel)
            found, _ = await get_results(stub, request_id="before-restart")
            ask = pb.FindRecipientRequest(
                request_id="before-restart", recipient=pb.Recipient(external_user_id="u55")
            )
            answer = await stub.FindRecipient(ask, metadata=Harness.auth())
    finally:
        await gateway.stop(grace=0)
    assert list(found) == list(sent.results)
    assert answer.found and answer.position == 55
    assert len(fake.calls) == calls


async def cli(harness: Harness, *argv: str, tenant: str = "acme") -> tuple[int, str]:
    err = io.StringIO()
    code = await run(
        ["--target", harness.target, "--timeout", "30", *argv],
        environ={"CANVAS_GATEWAY_TOKEN": TOKENS[tenant]},
        stdin=io.StringIO(""),
        stdout=io.StringIO(),
        stderr=err,
    )
    return code, err.getvalue()


def rows(path: Path) -> list[dict[str, Any]]:
    found = [json.loads(line) for line in path.read_text().splitlines()]
    return sorted(
        ({k: v for k, v in row.items() if k not in ("recipient", "line")} for row in found), key=str
    )


@pytest.mark.parametrize("faults", [0, 5])
async def test_the_results_command_writes_the_sends_results_file(
    harness: Harness, tmp_path: Path, faults: int
) -> None:
    """A crashed bulk job is reconciled with one command: the same rows (less the identifier,
    which the gateway does not keep) and the same exit status as the send."""
    harness.fake.faults.script([Fault.status(500)] * faults)
    body = tmp_path / "body.json"
    body.write_text(
        json.dumps({"canvas_id": "c", "recipients": [{"external_user_id": f"u{n}"} for n in range(70)]})
    )
    sent_code, _ = await cli(
        harness,
        "send",
        "--file",
        str(body),
        "--idempotency-key",
        "job-z",
        "--results",
        str(tmp_path / "sent.jsonl"),
    )
    calls = len(harness.fake.calls)

    code, err = await cli(
        harness, "results", "--idempotency-key", "job-z", "--results", str(tmp_path / "read.jsonl")
    )

    assert code == sent_code == (1 if faults else 0), err
    assert rows(tmp_path / "read.jsonl") == rows(tmp_path / "sent.jsonl")
    assert len(rows(tmp_path / "read.jsonl")) == 70
    assert len(harness.fake.calls) == calls
    code, err = await cli(harness, "results", "--request-id", "nobody-sent-this")
    assert code == 5 and "NOT_FOUND" in err
    code, err = await cli(harness, "results", "--idempotency-key", "job-z", tenant="globex")
    assert code == 5 and "NOT_FOUND" in err


async def test_the_client_reads_results_and_finds_a_recipient(harness: Harness) -> None:
    async with CanvasGatewayClient(harness.target, TOKENS["acme"]) as client:
        sent = await client.send(
            {
                "canvas_id": "c",
                "recipients": [{"email": "Ann@Example.com", "prioritization": ["identified"]}],
            },
            idempotency_key="job-e",
        )
        responses = [r async for r in client.get_results(idempotency_key="job-e")]
        found = await client.find_recipient(pb.Recipient(email="ann@example.com"), idempotency_key="job-e")
    assert [r.result for r in responses[:-1]] == list(sent.results)
    assert responses[-1].summary.recipients_sent == 1
    assert found.found and found.position == 0 and found.result == sent.results[0]


async def test_while_redis_does_not_answer_sends_go_on_and_reads_are_unavailable(
    fake: FakeBraze, tmp_path: Path
) -> None:
    """The results store failing never fails a batch: an unkeyed Send is sent and answered, what
    was not kept is counted (and logged); GetResults, FindRecipient, ListUnknown say UNAVAILABLE."""
    async with redis_server() as redis:
        gateway = await gateway_of(fake, tmp_path, redis_url=redis.url, redis_timeout_seconds=0.2)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = pb_grpc.CanvasGatewayServiceStub(channel)
                await redis.stop()
                sent = await stub.Send(send_request(60), metadata=with_request_id("acme", "redis-down"))
                assert [r.outcome for r in sent.results] == [pb.OUTCOME_SENT] * 2
                await gateway.dispatcher.recorder.flush()  # the write behind the answer, refused
                failed = gateway.registry.get_sample_value(
                    "canvas_gateway_results_kept_total", {"tenant": "acme", "state": "failed"}
                )
                assert failed == 2
                for call in (
                    get_results(stub, request_id="redis-down"),
                    stub.FindRecipient(
                        pb.FindRecipientRequest(
                            request_id="redis-down", recipient=pb.Recipient(external_user_id="u1")
                        ),
                        metadata=Harness.auth(),
                    ),
                    stub.ListUnknown(pb.ListUnknownRequest(), metadata=Harness.auth()).read(),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await gateway.stop(grace=0)


async def test_many_results_at_once_are_written_together() -> None:
    """Past FLUSH_ROWS waiting the writer goes at once; each read finds what was recorded."""
    store = LocalResults(60.0, 10_000, 60.0)
    recorder = outcomes.Recorder(store)
    tenant = Tenant("acme", "http://127.0.0.1", "key")
    result = BatchResult(0, (0,), Outcome.SENT, Code.OK)
    for n in range(outcomes.FLUSH_ROWS + 1):
        recorder.record(RequestContext.of(tenant, request_id=f"r{n}"), result)
    await recorder.flush()
    assert store.outcomes == outcomes.FLUSH_ROWS + 1
    await recorder.flush()  # nothing left: at once
    assert [kept.result for kept in await recorder.read("acme", "request:r7")] == [result]


async def test_a_stream_cut_off_while_braze_is_called_keeps_what_each_batch_became(harness: Harness) -> None:
    """The caller goes while its first batch's call is under way and its second waits (a budget
    Braze never answered lets one call ask first): the first is kept UNKNOWN (it may have been
    sent), the second NOT_ATTEMPTED, under the key and the request id, every position once."""
    harness.fake.faults.script([Fault.delay(1.0)])
    header = pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c", recipients=users(100)))
    header.options.idempotency_key = "job-mid-call"
    call = harness.stub.SendStream(
        iter([pb.SendStreamRequest(header=header)]), metadata=with_request_id("acme", "mid-call")
    )
    reading = asyncio.ensure_future(call.read())  # the call starts with its first read

    def in_flight() -> float:
        return (
            harness.gateway.registry.get_sample_value("canvas_gateway_batches_in_flight", {"tenant": "acme"})
            or 0
        )

    await until(lambda: harness.fake.in_progress == 1 and in_flight() == 2)
    call.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    await until(lambda: in_flight() == 0)
    for name in ({"idempotency_key": "job-mid-call"}, {"request_id": "mid-call"}):
        found, _ = await get_results(harness.stub, **name)
        assert positions(found) == list(range(100))
        assert [r.outcome for r in found] == [pb.OUTCOME_UNKNOWN, pb.OUTCOME_NOT_ATTEMPTED]
    listed = [b async for b in harness.stub.ListUnknown(pb.ListUnknownRequest(), metadata=harness.auth())]
    assert [(b.request_id, b.result.batch_index) for b in listed] == [("mid-call", 0)]


async def test_a_bulk_job_killed_mid_stream_is_reconciled_with_one_command(
    harness: Harness, tmp_path: Path
) -> None:
    """`canvas-gateway send-stream` SIGKILLed while its first batch's call is under way and the
    others wait: `results --idempotency-key` writes every position once, each as the gateway
    ended it (UNKNOWN for the batch whose call had left, NOT_ATTEMPTED for the rest), and Braze
    is not called for it."""
    harness.fake.faults.script([Fault.delay(1.0)])
    (tmp_path / "header.json").write_text('{"canvas_id": "c"}')
    lines = tmp_path / "r.jsonl"
    lines.write_text("".join(json.dumps({"external_user_id": f"u{n}"}) + "\n" for n in range(300)))
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "canvas-gateway"),
        "--target", harness.target,
        "send-stream", "--header", str(tmp_path / "header.json"), "--recipients", str(lines),
        "--idempotency-key", "bulk-killed", "--chunk-size", "100",
        env={**os.environ, "CANVAS_GATEWAY_TOKEN": TOKENS["acme"]},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip

    def in_flight() -> float:
        return (
            harness.gateway.registry.get_sample_value("canvas_gateway_batches_in_flight", {"tenant": "acme"})
            or 0
        )

    try:
        await until(lambda: harness.fake.in_progress == 1 and in_flight() == 6)
    finally:
        process.kill()
        await process.wait()
    await until(lambda: in_flight() == 0 and harness.fake.in_progress == 0)
    calls = len(harness.fake.calls)

    code, err = await cli(
        harness, "results", "--idempotency-key", "bulk-killed", "--results", str(tmp_path / "read.jsonl")
    )

    assert code == 1, err
    rows = [json.loads(line) for line in (tmp_path / "read.jsonl").read_text().splitlines()]
    assert sorted(row["position"] for row in rows) == list(range(300))
    assert Counter(row["outcome"] for row in rows) == {"UNKNOWN": 50, "NOT_ATTEMPTED": 250}
    assert len(harness.fake.calls) == calls == 1
