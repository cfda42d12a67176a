"""The acknowledged way out of UNKNOWN (`replaying`, ListUnknown, Replay): a Braze outage leaves
UNKNOWN batches, listed per tenant with their exact bodies kept; only an acknowledged replay
sends exactly those bodies again, once; a second replay is answered from the record."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import grpc
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_client import CanvasGatewayClient
from canvas_gateway_client.cli import run
from canvas_gateway_server.settings import Settings
from fake_braze import FakeBraze, Fault
from support import (
    FAKE_URLS,
    LOCAL,
    TOKENS,
    Harness,
    gateway_of,
    replicas_on_redis,
    send_request,
    start_gateway,
    tenants_toml,
    with_request_id,
)


async def unknown(
    stub: pb_grpc.CanvasGatewayServiceAsyncStub, tenant: str = "acme"
) -> list[pb.ListUnknownResponse]:
    return [batch async for batch in stub.ListUnknown(pb.ListUnknownRequest(), metadata=Harness.auth(tenant))]


async def outage(harness: Harness) -> tuple[pb.SendResponse, list[bytes]]:
    """A send of 3 batches during which Braze answers 500 twice: 2 UNKNOWN batches, 1 SENT."""
    harness.fake.faults.script([Fault.status(500), Fault.status(500)])
    sent = await harness.stub.Send(send_request(120, "job-o"), metadata=with_request_id("acme", "job-o-1"))
    assert sorted(r.outcome for r in sent.results) == [
        pb.OUTCOME_SENT,
        pb.OUTCOME_UNKNOWN,
        pb.OUTCOME_UNKNOWN,
    ]
    return sent, [call.raw for call in harness.fake.calls if call.status == 500]


async def test_an_acknowledged_replay_sends_exactly_the_unknown_bodies_once(harness: Harness) -> None:
    sent, failed_bodies = await outage(harness)
    listed = await unknown(harness.stub)
    lost = [r for r in sent.results if r.outcome == pb.OUTCOME_UNKNOWN]
    assert [(b.idempotency_key, b.request_id, b.result) for b in listed] == [
        ("job-o", "job-o-1", r) for r in lost
    ]
    assert await unknown(harness.stub, "globex") == []

    # Without the acknowledgement nothing is sent.
    calls = len(harness.fake.calls)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.stub.Replay(pb.ReplayRequest(request_id="job-o-1"), metadata=harness.auth())
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(harness.fake.calls) == calls

    ask = pb.ReplayRequest(idempotency_key="job-o", acknowledge_duplicates=True)
    replayed = await harness.stub.Replay(ask, metadata=with_request_id("acme", "replay-1"))

    new_calls = harness.fake.calls[calls:]
    assert sorted(call.raw for call in new_calls) == sorted(failed_bodies)  # those bodies, byte for byte
    assert [r.batch_index for r in replayed.results] == [r.batch_index for r in lost]
    assert all(r.outcome == pb.OUTCOME_SENT and not r.replayed for r in replayed.results)
    assert replayed.summary.recipients_sent == 100 and replayed.summary.request_id == "replay-1"
    assert await unknown(harness.stub) == []

    # GetResults now tells the replay's outcome in place of UNKNOWN.
    found = [
        r.result
        async for r in harness.stub.GetResults(
            pb.GetResultsRequest(idempotency_key="job-o"), metadata=harness.auth()
        )
        if r.HasField("result")
    ]
    assert [r.outcome for r in found] == [pb.OUTCOME_SENT] * 3

    # A second replay, of all or by index, by key or by request id: never a third send.
    calls = len(harness.fake.calls)
    assert not (await harness.stub.Replay(ask, metadata=harness.auth())).results  # none UNKNOWN now
    indexes = [r.batch_index for r in lost]
    for key, request_id in (("", "job-o-1"), ("job-o", ""), ("", "replay-1")):
        again = pb.ReplayRequest(
            idempotency_key=key, request_id=request_id, acknowledge_duplicates=True, batch_indexes=indexes
        )
        second = await harness.stub.Replay(again, metadata=harness.auth())
        assert [(r.batch_index, r.outcome, r.replayed) for r in second.results] == [
            (index, pb.OUTCOME_SENT, True) for index in indexes
        ]
    assert len(harness.fake.calls) == calls


async def test_a_batch_that_is_not_unknown_is_not_replayed(harness: Harness) -> None:
    sent, _ = await outage(harness)
    calls = len(harness.fake.calls)
    ok = next(r for r in sent.results if r.outcome == pb.OUTCOME_SENT)
    ask = pb.ReplayRequest(request_id="job-o-1", acknowledge_duplicates=True, batch_indexes=[ok.batch_index])
    answer = await harness.stub.Replay(ask, metadata=harness.auth())
    [refused] = answer.results
    assert (
        refused.outcome == pb.OUTCOME_REJECTED
        and refused.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    )
    assert len(harness.fake.calls) == calls
    ask = pb.ReplayRequest(request_id="job-o-1", acknowledge_duplicates=True, batch_indexes=[9])
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await harness.stub.Replay(ask, metadata=harness.auth())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_another_tenant_cannot_replay_or_list(harness: Harness) -> None:
    await outage(harness)
    calls = len(harness.fake.calls)
    for ask in (
        pb.ReplayRequest(acknowledge_duplicates=True, idempotency_key="job-o"),
        pb.ReplayRequest(acknowledge_duplicates=True, request_id="job-o-1"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await harness.stub.Replay(ask, metadata=harness.auth("globex"))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(harness.fake.calls) == calls
    assert len(await unknown(harness.stub)) == 2


async def test_a_replay_that_ends_unknown_again_is_never_sent_a_third_time(harness: Harness) -> None:
    await outage(harness)
    harness.fake.faults.script([Fault.status(503), Fault.status(503)])
    ask = pb.ReplayRequest(request_id="job-o-1", acknowledge_duplicates=True)
    first = await harness.stub.Replay(ask, metadata=harness.auth())
    assert [r.outcome for r in first.results] == [pb.OUTCOME_UNKNOWN] * 2
    calls = len(harness.fake.calls)
    second = await harness.stub.Replay(ask, metadata=harness.auth())
    assert [(r.outcome, r.replayed) for r in second.results] == [(pb.OUTCOME_UNKNOWN, True)] * 2
    assert len(harness.fake.calls) == calls
    assert await unknown(harness.stub) == []


async def test_three_gateways_on_redis_replay_a_batch_once(fake: FakeBraze, tmp_path: Path) -> None:
    """Three replicas asked at once: each batch is sent again once in all."""
    async with replicas_on_redis(fake, tmp_path, 3) as stubs:
        fake.faults.script([Fault.status(500), Fault.status(500)])
        await stubs[0].Send(send_request(120, "job-r"), metadata=with_request_id("acme", "job-r-1"))
        async with asyncio.timeout(5):  # written behind the answer: another replica lists them soon
            while len(indexes := [batch.result.batch_index for batch in await unknown(stubs[1])]) < 2:
                await asyncio.sleep(0.01)
        assert len(indexes) == 2
        calls = len(fake.calls)
        fake.faults.script([Fault.delay(0.3), Fault.delay(0.3)])
        ask = pb.ReplayRequest(request_id="job-r-1", acknowledge_duplicates=True)
        answers = await asyncio.gather(
            *(stub.Replay(ask, metadata=Harness.auth()) for stub in stubs), return_exceptions=True
        )
        assert len(fake.calls) - calls == 2
        ask.batch_indexes[:] = indexes  # named: "all UNKNOWN" names none now
        again = await stubs[2].Replay(ask, metadata=Harness.auth())
        assert all(r.replayed for r in again.results) and len(again.results) == 2
        assert len(fake.calls) - calls == 2
        assert all(not isinstance(answer, BaseException) for answer in answers)


async def cli(harness: Harness, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run(
        ["--target", harness.target, "--timeout", "30", *argv],
        environ={"CANVAS_GATEWAY_TOKEN": TOKENS["acme"]},
        stdin=io.StringIO(""),
        stdout=out,
        stderr=err,
    )
    return code, out.getvalue(), err.getvalue()


async def test_the_runbook_commands_list_and_replay(harness: Harness, tmp_path: Path) -> None:
    sent, failed_bodies = await outage(harness)
    code, out, err = await cli(harness, "unknown")
    listed = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and "2 UNKNOWN batches" in err
    assert {(b["request_id"], b["result"]["batch_index"]) for b in listed} == {
        ("job-o-1", r.batch_index) for r in sent.results if r.outcome == pb.OUTCOME_UNKNOWN
    }
    calls = len(harness.fake.calls)
    code, _, err = await cli(harness, "replay", "--request-id", "job-o-1")
    assert code == 5 and "FAILED_PRECONDITION" in err and len(harness.fake.calls) == calls

    first = listed[0]["result"]["batch_index"]
    code, out, _ = await cli(
        harness,
        "replay",
        "--request-id",
        "job-o-1",
        "--batch",
        str(first),
        "--acknowledge-duplicates",
        "--results",
        str(tmp_path / "replayed.jsonl"),
    )
    assert code == 0
    assert len(harness.fake.calls) == calls + 1 and harness.fake.calls[-1].raw in failed_bodies
    rows = [json.loads(line) for line in (tmp_path / "replayed.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and {row["outcome"] for row in rows} == {"SENT"}
    code, out, err = await cli(harness, "unknown")
    assert code == 0 and len(out.splitlines()) == 1


async def test_the_client_lists_and_replays(harness: Harness) -> None:
    await outage(harness)
    async with CanvasGatewayClient(harness.target, TOKENS["acme"]) as client:
        listed = [batch async for batch in client.list_unknown()]
        answer = await client.replay(acknowledge_duplicates=True, idempotency_key="job-o")
        assert [batch async for batch in client.list_unknown()] == []
    assert [r.batch_index for r in answer.results] == [b.result.batch_index for b in listed]


async def test_a_502_is_retried_only_for_a_tenant_that_chose_it(fake: FakeBraze, tmp_path: Path) -> None:
    """Braze says a 502 failed before reaching its server: `retry_502 = true` (globex here) calls
    again; by default (acme) a 502 is UNKNOWN, as every 5xx, and is not sent again."""
    tenants_file = tmp_path / "tenants.toml"
    tenants = tenants_toml(FAKE_URLS[id(fake)]).replace(
        "allow_broadcast = true\n", "allow_broadcast = true\nretry_502 = true\n"
    )
    tenants_file.write_text(tenants)
    settings = Settings.from_env(
        {}, grpc_address="127.0.0.1:0", tenants_file=str(tenants_file), retry_base_delay_seconds=0.01, **LOCAL
    )
    gateway = await start_gateway(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = pb_grpc.CanvasGatewayServiceStub(channel)
            fake.faults.script([Fault.status(502)])
            [acme] = (await stub.Send(send_request(10), metadata=Harness.auth("acme"))).results
            fake.faults.script([Fault.status(502)])
            [globex] = (await stub.Send(send_request(10), metadata=Harness.auth("globex"))).results
        assert (acme.outcome, acme.attempts) == (pb.OUTCOME_UNKNOWN, 1)
        assert (globex.outcome, globex.attempts) == (pb.OUTCOME_SENT, 2)
        assert [call.status for call in fake.calls] == [502, 502, 201]
        retried = gateway.registry.get_sample_value(
            "canvas_gateway_retries_total", {"tenant": "globex", "reason": "bad_gateway"}
        )
        assert retried == 1
    finally:
        await gateway.stop(grace=0)


async def test_unknown_batches_outlive_a_restart_and_are_replayed_once(
    fake: FakeBraze, tmp_path: Path
) -> None:
    """In the host's SQLite file: a gateway restarted after the outage lists the UNKNOWN batches,
    replays them once, and a restart after the replay does not send them again."""
    keys = str(tmp_path / "keys.sqlite3")

    async def on_a_gateway(
        ask: pb.ReplayRequest | None = None,
    ) -> tuple[list[pb.ListUnknownResponse], pb.ReplayResponse | None]:
        gateway = await gateway_of(fake, tmp_path, idempotency_file=keys)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = pb_grpc.CanvasGatewayServiceStub(channel)
                if ask is None:
                    fake.faults.script([Fault.status(500), Fault.status(500)])
                    await stub.Send(send_request(120, "job-s"), metadata=with_request_id("acme", "job-s-1"))
                    return [], None
                listed = await unknown(stub)
                return listed, await stub.Replay(ask, metadata=Harness.auth())
        finally:
            await gateway.stop(grace=0)

    await on_a_gateway()
    failed = sorted(call.raw for call in fake.calls if call.status == 500)
    calls = len(fake.calls)
    ask = pb.ReplayRequest(request_id="job-s-1", acknowledge_duplicates=True)
    listed, first = await on_a_gateway(ask)
    assert len(listed) == 2 and first is not None
    assert sorted(call.raw for call in fake.calls[calls:]) == failed
    ask.batch_indexes[:] = [b.result.batch_index for b in listed]
    listed, second = await on_a_gateway(ask)
    assert listed == [] and second is not None and all(r.replayed for r in second.results)
    assert len(fake.calls) == calls + 2


async def test_the_unknown_list_is_kept_in_spans_of_the_ttl() -> None:
    """Listed in the span it was made in, found from the next span too (within the TTL of its
    write); a replay marked in the next span takes it off the list."""
    from canvas_gateway_server import outcomes
    from canvas_gateway_server.context import RequestContext
    from canvas_gateway_server.model import Batch, BatchResult, Code, Outcome
    from canvas_gateway_server.stores.memory import LocalResults
    from canvas_gateway_server.tenants import Tenant

    now = [1090.0]
    store = LocalResults(100.0, 1000, 60.0, clock=lambda: now[0])
    recorder = outcomes.Recorder(store, ttl=100.0, clock=lambda: now[0])
    tenant = Tenant("acme", "http://127.0.0.1", "key")
    batch = Batch(0, (0,), b'{"canvas_id":"c","recipients":[{"external_user_id":"u0"}]}')
    lost = BatchResult(0, (0,), Outcome.UNKNOWN, Code.UNKNOWN)
    recorder.record(RequestContext.of(tenant, request_id="r1"), lost, batch)
    assert [k.result for k in await recorder.unknown("acme")] == [lost]
    now[0] = 1110.0  # the next span, within the TTL of the write
    store.expire()
    assert [k.origin.request_id for k in await recorder.unknown("acme")] == ["r1"]
    sent = BatchResult(0, (0,), Outcome.SENT, Code.OK)
    recorder.record_replay("acme", "replay", outcomes.Origin("r1", "", "replay"), sent, batch)
    assert await recorder.unknown("acme") == []
