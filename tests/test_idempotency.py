"""Idempotency keys: a repeat sends nothing twice; through real gRPC and the fake Braze, and the
stores (this process's, the host's SQLite file and Redis) held to the same rules."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server import results
from canvas_gateway_server.context import IdempotencyScope as Scope
from canvas_gateway_server.errors import ConfigError, StoreLost, StoreUnavailable
from canvas_gateway_server.idempotency import Claim, Claimed, Ledger, ResultStore, Verdict
from canvas_gateway_server.keeping import decode, describe, encode
from canvas_gateway_server.metrics import PrometheusMetrics
from canvas_gateway_server.model import Batch, BatchResult, Code, Outcome
from canvas_gateway_server.reply import Delivery, Reply
from canvas_gateway_server.settings import Settings, State
from canvas_gateway_server.stores import host_results
from canvas_gateway_server.stores.host_results import HostResults
from canvas_gateway_server.stores.memory import LocalResults
from canvas_gateway_server.stores.redis import RedisResults, acknowledge_loss, connect
from canvas_gateway_server.tenants import Tenant
from fake_braze import Fault
from google.rpc import error_details_pb2
from prometheus_client import CollectorRegistry
from servers import RedisServer, redis_server
from support import Clock, Harness, check_sent_once, idle, sent_to, until, violations_of

LEASE = State().idempotency_lease_seconds  # the setting's default

TENANT_KEY = "order-2026-11-29.a"


def trigger(first: int, count: int, canvas: str = "c") -> pb.CanvasTrigger:
    users = [pb.Recipient(external_user_id=f"u{first + i}") for i in range(count)]
    return pb.CanvasTrigger(canvas_id=canvas, recipients=users)


def request(count: int, key: str = TENANT_KEY, first: int = 0, **options: Any) -> pb.SendRequest:
    return pb.SendRequest(
        trigger=trigger(first, count), options=pb.SendOptions(idempotency_key=key, **options)
    )


def outcomes(response: pb.SendResponse) -> list[tuple[int, str, str, bool]]:
    return [
        (r.batch_index, pb.Outcome.Name(r.outcome), grpc.StatusCode(_code(r.code)).name, r.replayed)
        for r in response.results
    ]


def _code(number: int) -> tuple[int, str]:
    return next(code.value for code in grpc.StatusCode if code.value[0] == number)


async def test_a_repeat_returns_the_kept_results_and_calls_braze_no_more(harness: Harness) -> None:
    first = await harness.stub.Send(request(120), metadata=harness.auth())
    calls = len(harness.fake.calls)
    again = await harness.stub.Send(request(120), metadata=harness.auth())

    assert len(harness.fake.calls) == calls == 3
    assert [r.outcome for r in again.results] == [pb.OUTCOME_SENT] * 3
    assert all(r.replayed for r in again.results) and not any(r.replayed for r in first.results)
    assert [r.braze.dispatch_id for r in again.results] == [r.braze.dispatch_id for r in first.results]
    assert [list(r.positions) for r in again.results] == [list(r.positions) for r in first.results]
    assert again.summary.recipients_sent == 120
    assert set(sent_to(harness.fake).values()) == {1}
    # Another tenant's key of the same name is its own.
    other = await harness.stub.Send(request(10), metadata=harness.auth("initech"))
    assert [r.replayed for r in other.results] == [False]


async def test_the_same_key_with_another_body_is_refused_per_batch(harness: Harness) -> None:
    await harness.stub.Send(request(60), metadata=harness.auth())  # batches of 50 and 10
    calls = len(harness.fake.calls)
    changed = request(60)
    changed.trigger.recipients[55].external_user_id = "someone-else"
    response = await harness.stub.Send(changed, metadata=harness.auth())

    assert len(harness.fake.calls) == calls  # nothing sent
    assert outcomes(response) == [
        (0, "OUTCOME_SENT", "OK", True),
        (1, "OUTCOME_REJECTED", "FAILED_PRECONDITION", False),
    ]
    assert "batch 1 differs" in response.results[1].status_message


async def test_unknown_stays_unknown_and_what_was_not_sent_is_sent_on_replay(harness: Harness) -> None:
    # Batch 0 answers 500 (may have been sent: never again), batch 1 answers 429 (nothing sent).
    harness.fake.faults.script([Fault.status(500), Fault.status(429)])
    response = await harness.stub.Send(request(100), metadata=harness.auth())
    assert [r.outcome for r in response.results] == [pb.OUTCOME_UNKNOWN, pb.OUTCOME_REJECTED]
    assert response.results[1].retryable

    again = await harness.stub.Send(request(100), metadata=harness.auth())
    assert outcomes(again) == [(0, "OUTCOME_UNKNOWN", "UNKNOWN", True), (1, "OUTCOME_SENT", "OK", False)]
    assert len(harness.fake.calls) == 3  # the 500, the 429, and batch 1 once more
    third = await harness.stub.Send(request(100), metadata=harness.auth())
    assert outcomes(third) == [(0, "OUTCOME_UNKNOWN", "UNKNOWN", True), (1, "OUTCOME_SENT", "OK", True)]
    assert len(harness.fake.calls) == 3


@pytest.fixture
async def shared_redis(request: pytest.FixtureRequest) -> AsyncIterator[RedisServer | None]:
    """A Redis for the gateway to keep keys in, when a test parametrizes this with True."""
    if not getattr(request, "param", False):
        yield None
        return
    async with redis_server() as server:
        yield server


@pytest.fixture
def extra_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """More settings, when a test parametrizes this."""
    return dict(getattr(request, "param", {}))


@pytest.fixture
def settings_overrides(shared_redis: RedisServer | None, extra_settings: dict[str, Any]) -> dict[str, Any]:
    overrides: dict[str, Any] = {"max_attempts": 1}  # a 429 ends its batch at once, REJECTED and retryable
    if shared_redis is not None:
        overrides |= {"redis_url": shared_redis.url, "redis_timeout_seconds": 0.1, "request_concurrency": 20}
    return overrides | extra_settings


async def test_a_batch_in_flight_elsewhere_is_aborted_with_retry_info(harness: Harness) -> None:
    harness.fake.faults.script([Fault.delay(1.0)])
    slow = asyncio.ensure_future(harness.stub.Send(request(10), metadata=harness.auth()))
    await until(lambda: harness.fake.in_progress == 1)  # claimed, and calling the fake
    assert not slow.done()
    busy = await harness.stub.Send(request(10), metadata=harness.auth())
    result = busy.results[0]
    assert (pb.Outcome.Name(result.outcome), result.code, result.retryable) == (
        "OUTCOME_NOT_ATTEMPTED",
        10,
        True,
    )
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in result.details)
    assert (await slow).results[0].outcome == pb.OUTCOME_SENT
    assert len(harness.fake.calls) == 1


async def test_a_stream_cut_off_is_resumed_with_its_key_and_nobody_gets_it_twice(harness: Harness) -> None:
    harness.fake.faults.set_latency(0.02)

    def messages(count: int) -> list[pb.SendStreamRequest]:
        header = pb.StreamHeader(
            trigger=pb.CanvasTrigger(canvas_id="c"), options=pb.SendOptions(idempotency_key="bulk-1")
        )
        chunks = [pb.RecipientChunk(recipients=trigger(i, 100).recipients) for i in range(0, count, 100)]
        return [pb.SendStreamRequest(header=header), *(pb.SendStreamRequest(chunk=chunk) for chunk in chunks)]

    call = harness.stub.SendStream(iter(messages(1000)), metadata=harness.auth())
    seen = 0
    async for message in call:
        seen += message.HasField("result")
        if seen == 5:
            call.cancel()  # the caller goes away mid-stream
            break
    await until(lambda: idle(harness.gateway, harness.fake))  # batches cancelled with it settle their claims

    results: dict[int, pb.BatchResult] = {}
    async for message in harness.stub.SendStream(iter(messages(1000)), metadata=harness.auth()):
        if message.HasField("result"):
            assert message.result.batch_index not in results
            results[message.result.batch_index] = message.result
    positions = sorted(p for r in results.values() for p in r.positions)
    assert positions == list(range(1000))
    assert sum(r.replayed for r in results.values()) >= 5
    check_sent_once(results.values(), harness.fake)  # a batch the cancel caught in flight: UNKNOWN


async def test_a_bad_key_is_invalid_and_validate_only_keeps_nothing(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Send(request(3, key="no spaces allowed"), metadata=harness.auth())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in violations_of(caught.value)] == ["options.idempotency_key"]
    with pytest.raises(grpc.aio.AioRpcError):
        await harness.stub.Send(request(3, key="k" * 129), metadata=harness.auth())

    planned = await harness.stub.Send(request(3, validate_only=True), metadata=harness.auth())
    assert planned.results[0].outcome == pb.OUTCOME_NOT_ATTEMPTED
    sent = await harness.stub.Send(request(3), metadata=harness.auth())
    assert (sent.results[0].outcome, sent.results[0].replayed) == (pb.OUTCOME_SENT, False)


@pytest.mark.parametrize("shared_redis", [False, True], indirect=True)
@pytest.mark.parametrize(
    "extra_settings", [{"tenant_concurrency": 1, "idempotency_lease_seconds": 0.5}], indirect=True
)
async def test_a_claim_past_its_lease_is_sent_by_the_repeat_only_if_its_call_never_left(
    harness: Harness, shared_redis: RedisServer | None
) -> None:
    """Both batches of a call are claimed; one calls a slow Braze, the other waits for the one
    slot. Past the lease, a repeat finds the first UNKNOWN (its call left) and claims the other
    again (its call never did): one of the two calls sends it, the other is told it is in flight."""
    harness.fake.faults.set_latency(1.5)
    first = asyncio.ensure_future(harness.stub.Send(request(100), metadata=harness.auth()))
    async with asyncio.timeout(5):
        while harness.fake.in_progress < 1:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.6)  # the claims' lease (0.5 s) is over
    again = await harness.stub.Send(request(100), metadata=harness.auth())
    done = await first

    calling = 0 if b'"u0"' in harness.fake.arrived[0] else 1  # the batch that took the slot
    waiting = 1 - calling
    assert outcomes(again)[calling] == (calling, "OUTCOME_UNKNOWN", "UNKNOWN", True)
    assert outcomes(done)[calling] == (calling, "OUTCOME_SENT", "OK", False)
    pair = [done.results[waiting], again.results[waiting]]
    sent, aborted = sorted(pair, key=lambda r: r.outcome != pb.OUTCOME_SENT)
    assert (sent.outcome, sent.replayed) == (pb.OUTCOME_SENT, False)
    assert (aborted.outcome, aborted.code) == (pb.OUTCOME_NOT_ATTEMPTED, 10)  # ABORTED: in flight
    assert len(harness.fake.calls) == 2 and set(sent_to(harness.fake).values()) == {1}


@pytest.mark.parametrize("status", [401, 403, 404, 400])
async def test_a_batch_braze_refused_is_released_so_the_repeat_after_a_fix_sends_it(
    harness: Harness, status: int
) -> None:
    """A 401 (the tenant's key wrong), 403, 404 or 400 sent nothing: the claim is released, so
    once the cause is fixed the repeat sends the batch instead of replaying the refusal for 24 h."""
    harness.fake.faults.script([Fault.status(status)])
    refused = (await harness.stub.Send(request(10), metadata=harness.auth())).results[0]
    assert (refused.outcome, refused.retryable, refused.braze.http_status) == (
        pb.OUTCOME_REJECTED,
        False,
        status,
    )

    fixed = await harness.stub.Send(request(10), metadata=harness.auth())
    assert outcomes(fixed) == [(0, "OUTCOME_SENT", "OK", False)]
    assert len(harness.fake.calls) == 2 and set(sent_to(harness.fake).values()) == {1}


async def test_a_repeat_whose_last_batch_grew_is_told_what_was_sent(harness: Harness) -> None:
    first = await harness.stub.Send(request(70), metadata=harness.auth())  # batches of 50 and 20
    grown = await harness.stub.Send(request(80), metadata=harness.auth())  # the last has 30 now

    assert len(harness.fake.calls) == 2
    result = grown.results[1]
    assert (result.outcome, result.code) == (pb.OUTCOME_REJECTED, 9)  # FAILED_PRECONDITION
    dispatch_id = first.results[1].braze.dispatch_id
    assert dispatch_id and f"of 20 recipients ended SENT (dispatch_id {dispatch_id})" in result.status_message
    assert "nothing was sent" not in result.status_message
    assert "this call sent nothing for batch 1" in result.status_message


@pytest.mark.parametrize("shared_redis", [True], indirect=True)
async def test_a_redis_slower_than_its_timeout_gets_a_bounded_load_of_retried_releases(
    harness: Harness, shared_redis: RedisServer
) -> None:
    """200 keyed batches whose claims time out (Redis paused) leave 200 releases to make: one
    task offers them, backing off, so Redis sees a handful of new connections a second, not one
    per failed batch; once it answers they are all released, and the repeat sends each once."""
    control = aioredis.Redis.from_url(shared_redis.url)
    try:
        sends = [request(2500, key=f"slow-{n}", first=n * 2500) for n in range(4)]  # 200 batches
        await control.client_pause(8000, all=False)  # scripts wait
        failed = await asyncio.gather(*(harness.stub.Send(r, metadata=harness.auth()) for r in sends))
        for response in failed:
            assert {(r.outcome, r.code) for r in response.results} == {(pb.OUTCOME_NOT_ATTEMPTED, 14)}
        before = (await control.info("stats"))["total_connections_received"]
        await asyncio.sleep(3.0)  # still paused: the releases are retried
        opened = (await control.info("stats"))["total_connections_received"] - before
        assert opened <= 20, f"{opened} new connections to Redis in 3 s"
        await control.client_unpause()
    finally:
        await control.aclose()
    results: dict[tuple[int, int], pb.BatchResult] = {}
    async with asyncio.timeout(15):  # a batch is ABORTED (in flight) until its claim is released
        while len(results) < 200:
            for n, each in enumerate(sends):
                for result in (await harness.stub.Send(each, metadata=harness.auth())).results:
                    if result.outcome != pb.OUTCOME_NOT_ATTEMPTED:
                        results.setdefault((n, result.batch_index), result)
            await asyncio.sleep(0.1)
    assert {(r.outcome, r.replayed) for r in results.values()} == {(pb.OUTCOME_SENT, False)}
    assert len(harness.fake.calls) == 200 and len(sent_to(harness.fake)) == 10_000
    assert set(sent_to(harness.fake).values()) == {1}


@pytest.mark.parametrize("shared_redis", [True], indirect=True)
async def test_a_redis_restarted_empty_refuses_keys_until_an_operator_accepts_the_loss(
    harness: Harness, shared_redis: RedisServer
) -> None:
    first = await harness.stub.Send(request(100), metadata=harness.auth())
    assert [r.outcome for r in first.results] == [pb.OUTCOME_SENT] * 2
    await shared_redis.restart()  # no append-only file: everything it kept is gone

    refused = await harness.stub.Send(request(100), metadata=harness.auth())
    for result in refused.results:
        assert (result.outcome, result.code, result.retryable) == (pb.OUTCOME_NOT_ATTEMPTED, 9, False)
        assert "(Redis) lost what it kept" in result.status_message
        assert "--accept-lost-keys" in result.status_message
        assert shared_redis.url not in result.status_message
    assert len(harness.fake.calls) == 2  # nothing sent twice
    registry = harness.gateway.registry
    assert registry.get_sample_value("canvas_gateway_shared_store_lost_total") == 1
    assert registry.get_sample_value("canvas_gateway_idempotency_keys_refused") == 1
    await asyncio.sleep(1.5)  # heartbeats: still refused, still counted once
    after = request(10, key="after-the-loss", first=1000)
    other_key = await harness.stub.Send(after, metadata=harness.auth())
    assert other_key.results[0].outcome == pb.OUTCOME_NOT_ATTEMPTED
    unkeyed = pb.SendRequest(trigger=trigger(500, 10))
    assert (await harness.stub.Send(unkeyed, metadata=harness.auth())).results[0].outcome == pb.OUTCOME_SENT
    assert registry.get_sample_value("canvas_gateway_shared_store_lost_total") == 1

    accepted = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "canvas_gateway_server",
        "--accept-lost-keys",
        env={
            **os.environ,
            "CGW_REDIS_URL": shared_redis.url,
            "CGW_TENANTS_FILE": harness.gateway.settings.tenants.file,  # as the gateway's own settings
        },
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await accepted.communicate()
    assert accepted.returncode == 0 and out.startswith(b"acknowledged")
    async with asyncio.timeout(5):  # each gateway adopts it with its next heartbeat
        while registry.get_sample_value("canvas_gateway_idempotency_keys_refused"):
            await asyncio.sleep(0.05)
    taken = await harness.stub.Send(after, metadata=harness.auth())
    assert outcomes(taken) == [(0, "OUTCOME_SENT", "OK", False)]
    assert max(sent_to(harness.fake).values()) == 1


# --- the stores --------------------------------------------------------------------------------


@pytest.fixture(params=["local", "host", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ResultStore]:
    if request.param == "local":
        yield LocalResults(ttl=60.0, capacity=100, lease=60.0)
        return
    if request.param == "host":
        host_results.create(str(tmp_path / "keys.sqlite3"), private_folder=False)
        host = HostResults(str(tmp_path / "keys.sqlite3"), ttl=60.0, lease=60.0)
        host.start()
        try:
            yield host
        finally:
            await host.stop()
        return
    async with redis_server() as server:
        client = connect(server.url, 1.0)
        results = RedisResults(client, ttl=60.0, lease=60.0)
        results.start()
        try:
            yield results
        finally:
            await results.stop()
            await client.aclose()


async def test_a_store_claims_keeps_refuses_and_releases(store: ResultStore) -> None:
    assert (await store.claim(Scope("acme", "k"), 0, "d0", "t0")).verdict is Verdict.CLAIMED
    assert (
        await store.claim(Scope("acme", "k"), 0, "d0", "t0")
    ).verdict is Verdict.BUSY  # claimed, not kept yet
    assert (await store.claim(Scope("acme", "k"), 0, "other", "t0")).verdict is Verdict.MISMATCH
    await store.keep(Scope("acme", "k"), 0, "d0", "t0", b'{"kept": 1}')
    kept = await store.claim(Scope("acme", "k"), 0, "d0", "t0")
    assert (kept.verdict, kept.kept) == (Verdict.KEPT, b'{"kept": 1}')
    assert (await store.claim(Scope("acme", "k"), 0, "other", "t0")).verdict is Verdict.MISMATCH

    assert (await store.claim(Scope("acme", "k"), 1, "d1", "t1")).verdict is Verdict.CLAIMED
    await store.keep(Scope("acme", "k"), 1, "d1", "an-earlier-claim", None)  # not its claim: no release
    await store.keep(Scope("acme", "k"), 1, "d1", "an-earlier-claim", b"x")  # nor does it keep over it
    assert (await store.claim(Scope("acme", "k"), 1, "d1", "t2")).verdict is Verdict.BUSY
    assert await store.mark_sending(Scope("acme", "k"), 1, "an-earlier-claim") is False
    assert await store.mark_sending(Scope("acme", "k"), 1, "t1") is True
    await store.keep(Scope("acme", "k"), 1, "d1", "t1", None)  # released: nothing was sent
    assert (await store.claim(Scope("acme", "k"), 1, "d1", "t1")).verdict is Verdict.CLAIMED
    assert (await store.claim(Scope("globex", "k"), 0, "x", "t0")).verdict is Verdict.CLAIMED  # scopes apart
    # Another body under the key is told what became of the kept one, or that it is in flight.
    assert (await store.claim(Scope("acme", "k"), 1, "other", "t3")) == Claim(Verdict.MISMATCH, None)
    assert (await store.claim(Scope("acme", "k"), 0, "other", "t3")) == Claim(
        Verdict.MISMATCH, b'{"kept": 1}'
    )
    assert await store.mark_sending(Scope("acme", "k"), 0, "t0") is False  # kept: no call leaves for it


async def test_the_stores_name_a_scope_as_before_so_what_they_kept_stays_readable(tmp_path: Path) -> None:
    """Redis keys and SQLite rows name a scope "tenant/key" (`IdempotencyScope.text`), byte for byte
    as before the scope was typed, so a gateway upgraded over kept results still finds them."""
    scope = Scope("acme", "order/7 ü")
    async with redis_server() as server:
        client = connect(server.url, 1.0)
        results = RedisResults(client, ttl=60.0, lease=60.0)
        try:
            await results.claim(scope, 3, "d", "t")
            await results.keep(scope, 3, "d", "t", b"r")
            assert await client.call("EXISTS", "cgw:result:acme/order/7 ü:3") == 1
        finally:
            await client.aclose()
    path = str(tmp_path / "keys.sqlite3")
    host_results.create(path, private_folder=False)
    host = HostResults(path, ttl=60.0, lease=60.0)
    host.start()
    try:
        await host.claim(scope, 3, "d", "t")
        await host.keep(scope, 3, "d", "t", b"r")
    finally:
        await host.stop()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT scope, idx, kept FROM results").fetchall() == [("acme/order/7 ü", 3, b"r")]


@asynccontextmanager
async def two_redis_processes() -> AsyncIterator[tuple[RedisResults, RedisResults]]:
    async with redis_server() as server:
        client = connect(server.url, 1.0)
        gone, alive = RedisResults(client, 60.0, 60.0), RedisResults(client, 60.0, 60.0)
        gone.start()
        alive.start()
        try:
            yield gone, alive
        finally:
            await alive.stop()
            await client.aclose()


@asynccontextmanager
async def two_host_processes() -> AsyncIterator[tuple[HostResults, HostResults]]:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "keys.sqlite3")
        host_results.create(path, private_folder=False)
        gone, alive = HostResults(path, 60.0, 60.0), HostResults(path, 60.0, 60.0)
        gone.start()
        alive.start()
        await asyncio.sleep(0)  # both beat
        try:
            yield gone, alive
        finally:
            await alive.stop()


Processes = Callable[[], AbstractAsyncContextManager[tuple[Any, Any]]]


@pytest.mark.parametrize("processes", [two_redis_processes, two_host_processes], ids=["redis", "host"])
async def test_a_dead_claim_is_sent_again_unless_its_call_may_have_left(processes: Processes) -> None:
    """A claim whose gateway is gone (heartbeat lapsed) is claimed again by the next call if it
    never reached `mark_sending`; past that mark it is LOST (UNKNOWN) for good."""
    async with processes() as (gone, alive):
        assert (await gone.claim(Scope("acme", "k"), 0, "d", "t0")).verdict is Verdict.CLAIMED  # waits
        assert (await gone.claim(Scope("acme", "k"), 1, "d", "t0")).verdict is Verdict.CLAIMED
        assert await gone.mark_sending(Scope("acme", "k"), 1, "t0")  # its call may leave
        assert (
            await alive.claim(Scope("acme", "k"), 0, "d", "t1")
        ).verdict is Verdict.BUSY  # its gateway runs
        if isinstance(gone, HostResults):
            await gone.beat()
        await gone.stop()  # its heartbeat is gone
        assert (await alive.claim(Scope("acme", "k"), 0, "d", "t1")).verdict is Verdict.RECLAIMED
        assert (await alive.claim(Scope("acme", "k"), 0, "d", "t2")).verdict is Verdict.BUSY  # t1's now
        if isinstance(gone, RedisResults):  # (a stopped HostResults is closed)
            assert not await gone.mark_sending(Scope("acme", "k"), 0, "t0")  # the dead claim sends nothing
            await gone.keep(Scope("acme", "k"), 0, "d", "t0", None)  # nor releases t1's claim
        assert not await alive.mark_sending(Scope("acme", "k"), 0, "t0")
        await alive.keep(Scope("acme", "k"), 0, "d", "t0", None)
        assert await alive.mark_sending(Scope("acme", "k"), 0, "t1")

        assert (await alive.claim(Scope("acme", "k"), 1, "d", "t1")).verdict is Verdict.LOST
        assert (
            await alive.claim(Scope("acme", "k"), 1, "d", "t1")
        ).verdict is Verdict.KEPT  # as UNKNOWN, for good
        await alive.keep(Scope("acme", "k"), 1, "d", "t0", None)  # a late release does not reopen it
        assert (await alive.claim(Scope("acme", "k"), 1, "d", "t1")).verdict is Verdict.KEPT


# --- the host's file ---------------------------------------------------------------------------


async def test_the_host_file_outlives_its_gateway_and_a_silent_owner_s_claim_is_lost(tmp_path: Path) -> None:
    path = str(tmp_path / "keys.sqlite3")
    host_results.create(path, private_folder=False)
    clock = Clock(1000.0)
    first = HostResults(path, ttl=60.0, lease=30.0, clock=clock)
    await first.beat()
    assert (await first.claim(Scope("acme", "k"), 0, "d", "t0")).verdict is Verdict.CLAIMED
    await first.keep(Scope("acme", "k"), 0, "d", "t0", b"sent")
    assert (await first.claim(Scope("acme", "k"), 1, "d", "t1")).verdict is Verdict.CLAIMED
    assert await first.mark_sending(Scope("acme", "k"), 1, "t1")  # its call may have left
    assert (await first.claim(Scope("acme", "k"), 2, "d", "t2")).verdict is Verdict.CLAIMED  # never left
    first._quick.close()  # killed: no goodbye, its heartbeat row stays
    await first._run(sqlite3.Connection.close)

    again = HostResults(path, ttl=60.0, lease=30.0, clock=clock)  # the gateway restarted
    try:
        assert (await again.claim(Scope("acme", "k"), 0, "d", "t0")) == (
            await again.claim(Scope("acme", "k"), 0, "d", "t9")
        )
        assert (await again.claim(Scope("acme", "k"), 0, "d", "t0")).kept == b"sent"
        assert (await again.claim(Scope("acme", "k"), 1, "d", "t1")).verdict is Verdict.BUSY  # beat 0 s ago
        clock.now += host_results.HEARTBEAT_LAPSE_SECONDS
        assert (await again.claim(Scope("acme", "k"), 1, "d", "t1")).verdict is Verdict.LOST
        assert (await again.claim(Scope("acme", "k"), 2, "d", "t3")).verdict is Verdict.RECLAIMED
        await again.keep(Scope("acme", "k"), 2, "d", "t3", None)
        clock.now += 60.0  # past the TTL: an expired row is claimed anew, the purge deletes the other
        assert (await again.claim(Scope("acme", "k"), 0, "d", "t0")).verdict is Verdict.CLAIMED
        assert await again.beat() == 1
        assert (await again.claim(Scope("acme", "k"), 1, "d", "t0")).verdict is Verdict.CLAIMED
    finally:
        await again.stop()


async def test_two_workers_claiming_one_batch_at_once_get_one_claim(tmp_path: Path) -> None:
    path = str(tmp_path / "keys.sqlite3")
    host_results.create(path, private_folder=False)
    workers = [HostResults(path, ttl=60.0, lease=60.0) for _ in range(2)]
    try:
        for worker in workers:
            await worker.beat()  # alive: the other's claim is BUSY, not LOST
        for index in range(20):
            verdicts = await asyncio.gather(
                *(
                    worker.claim(Scope("acme", "k"), index, "d", uuid.uuid4().hex)
                    for worker in workers
                    for _ in range(4)
                )
            )
            assert sorted(v.verdict.value for v in verdicts) == ["busy"] * 7 + ["claimed"]
    finally:
        for worker in workers:
            await worker.stop()


async def test_a_worker_s_first_claim_is_made_once_its_heartbeat_is_written(tmp_path: Path) -> None:
    """A claim names its process, which other workers must see beating: else they take the claim
    as dead and claim the batch again. The first claim of a worker just started (its heartbeat
    not written yet: claims run on the event loop, the heartbeat on the thread) writes it first."""
    path = str(tmp_path / "keys.sqlite3")
    host_results.create(path, private_folder=False)
    first, other = HostResults(path, ttl=60.0, lease=60.0), HostResults(path, ttl=60.0, lease=60.0)
    try:
        assert (await first.claim(Scope("acme", "k"), 0, "d", "t0")).verdict is Verdict.CLAIMED
        assert (await other.claim(Scope("acme", "k"), 0, "d", "t1")).verdict is Verdict.BUSY
    finally:
        await first.stop()
        await other.stop()


async def test_a_call_that_finds_the_write_lock_held_waits_without_holding_the_event_loop(
    tmp_path: Path,
) -> None:
    """Claims, marks and keeps run on the event loop's connection, which never waits for the lock:
    while another worker writes, each sleeps and tries again, the loop runs on meanwhile, and every
    one is made once the lock is free. None is refused, none made twice."""
    path = str(tmp_path / "keys.sqlite3")
    host_results.create(path, private_folder=False)
    store = HostResults(path, ttl=60.0, lease=60.0)
    blocker = sqlite3.connect(path, isolation_level=None)
    scope = Scope("acme", "k")
    try:
        assert (await store.claim(scope, 0, "d", "t0")).verdict is Verdict.CLAIMED
        blocker.execute("BEGIN IMMEDIATE")  # another worker's write, under way
        claiming = asyncio.ensure_future(store.claim(scope, 1, "d", "t1"))
        marking = asyncio.ensure_future(store.mark_sending(scope, 0, "t0"))
        keeping = asyncio.ensure_future(store.keep(scope, 2, "d", "t2", b"r2"))
        ticks = 0
        for _ in range(20):  # the event loop is not held by the calls that wait for the lock
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 20
        assert not any(call.done() for call in (claiming, marking, keeping))
        blocker.execute("COMMIT")
        claimed, marked, _ = await asyncio.wait_for(asyncio.gather(claiming, marking, keeping), 5)
        assert claimed.verdict is Verdict.CLAIMED
        assert marked is True
        assert (await store.claim(scope, 1, "d", "t9")).verdict is Verdict.BUSY  # made once, by t1
        assert await store.claim(scope, 2, "d", "t9") == Claim(Verdict.KEPT, b"r2")
        assert (await store.claim(scope, 0, "d", "t9")).verdict is Verdict.BUSY
    finally:
        blocker.close()
        await store.stop()


async def test_a_call_that_never_gets_the_lock_is_unavailable_and_changed_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker holding the write lock past BUSY_SECONDS: the call gives up (the store does
    not answer, so the batch is not sent), and nothing of it was written."""
    monkeypatch.setattr(host_results, "BUSY_SECONDS", 0.1)
    path = str(tmp_path / "keys.sqlite3")
    host_results.create(path, private_folder=False)
    store = HostResults(path, ttl=60.0, lease=60.0)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        await store.beat()
        blocker.execute("BEGIN IMMEDIATE")
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"SQLite\) did not answer \(OperationalError\)"):
            await store.claim(Scope("acme", "k"), 0, "d", "t0")
        assert 0.1 <= time.monotonic() - began < 1.0
        blocker.execute("COMMIT")
        assert blocker.execute("SELECT count(*) FROM results").fetchone() == (0,)
        assert (await store.claim(Scope("acme", "k"), 0, "d", "t1")).verdict is Verdict.CLAIMED
    finally:
        blocker.close()
        await store.stop()


async def test_the_thread_checkpoints_what_the_event_loop_wrote(tmp_path: Path) -> None:
    """The event loop's connection never checkpoints (a flush to disk would hold the loop); the
    thread's commits do (its heartbeat, every second): the write-ahead log stops growing."""
    path = str(tmp_path / "keys.sqlite3")
    host_results.create(path, private_folder=False)
    store = HostResults(path, ttl=60.0, lease=60.0)
    wal = Path(path + "-wal")

    async def write(first: int) -> int:
        for index in range(first, first + 1500):
            await store.claim(Scope("acme", "k"), index, "d", f"t{index}")
        return wal.stat().st_size

    try:
        grown = await write(0)
        assert grown > 1000 * 4096  # past the 1,000 pages at which SQLite checkpoints by default
        await store.beat()  # the thread commits: it checkpoints the whole log
        again = await write(1500)
        assert again < 1.5 * grown  # written again from its start (as many pages again, about)
        assert await write(3000) > 1.5 * grown  # no checkpoint without the thread: it grows
    finally:
        await store.stop()


async def test_a_claim_whose_caller_went_away_while_it_was_made_is_released_at_once(tmp_path: Path) -> None:
    """A stream cut off while one of its batches was being claimed (waiting for another worker's
    write): whatever was made of the claim is released at once, not after a store failure's
    backoff, so that a resend on the other worker finds the batch free, not BUSY. (The backoff
    would be 0.2 s here.)"""
    path = str(tmp_path / "keys.sqlite3")
    host_results.create(path, private_folder=False)
    workers = [HostResults(path, ttl=60.0, lease=60.0) for _ in range(2)]
    ledger = Ledger(workers[0], lease=60.0, jitter=lambda: 1.0)
    other = Ledger(workers[1], lease=60.0)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        for worker in workers:
            await worker.beat()  # alive: its claims are BUSY to the other, not LOST
        blocker.execute("BEGIN IMMEDIATE")  # another worker's write: the claim waits for it
        claiming = asyncio.ensure_future(ledger.claim(Scope("acme", "k"), Batch(0, (0,), b"body")))
        await asyncio.sleep(0.05)
        claiming.cancel()  # the caller goes away while the claim waits to be written
        cut = time.monotonic()
        await asyncio.sleep(0.02)
        blocker.execute("COMMIT")  # the claim is written now, for a call that is gone
        await until(lambda: not ledger.backlog, 5)
        assert time.monotonic() - cut < 0.15  # released, without waiting out a backoff
        with pytest.raises(asyncio.CancelledError):
            await claiming
        assert isinstance(await other.claim(Scope("acme", "k"), Batch(0, (0,), b"body")), Claimed)
    finally:
        blocker.close()
        for worker in workers:
            await worker.stop()


async def test_a_broken_host_file_is_a_store_that_does_not_answer(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError, match="CGW_IDEMPOTENCY_FILE"):
        host_results.create(str(garbage), private_folder=False)
    path = tmp_path / "keys.sqlite3"
    host_results.create(str(path), private_folder=False)
    broken = HostResults(str(path), ttl=60.0, lease=60.0)
    assert (await broken.claim(Scope("acme", "k"), 1, "d", "t")).verdict is Verdict.CLAIMED
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE owners")
    with pytest.raises(StoreUnavailable):  # fails within the transaction: rolled back
        await broken.claim(Scope("acme", "k"), 1, "d", "t2")
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE results")
    failures: list[str] = []
    broken.start(lambda: failures.append("beat"))
    try:
        with pytest.raises(StoreUnavailable, match=r"SQLite\) did not answer \(OperationalError\)"):
            await broken.claim(Scope("acme", "k"), 0, "d", "t")
        with pytest.raises(StoreUnavailable):
            await broken.keep(Scope("acme", "k"), 0, "d", "t", b"r")
        await asyncio.sleep(0.05)
        assert failures == ["beat"]
    finally:
        await broken.stop()


async def test_a_host_file_made_before_claims_were_marked_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE results (scope TEXT NOT NULL, idx INTEGER NOT NULL, digest TEXT NOT NULL, "
            "owner TEXT NOT NULL, token TEXT NOT NULL, at REAL NOT NULL, kept BLOB, expires REAL NOT NULL, "
            "PRIMARY KEY (scope, idx)) WITHOUT ROWID"
        )
    host_results.create(str(path), private_folder=False)
    store = HostResults(str(path), ttl=60.0, lease=60.0)
    try:
        assert (await store.claim(Scope("acme", "k"), 0, "d", "t0")).verdict is Verdict.CLAIMED
        assert await store.mark_sending(Scope("acme", "k"), 0, "t0")
    finally:
        await store.stop()


async def test_a_host_file_whose_results_rows_were_without_rowid_keeps_them_in_a_rowid_table(
    tmp_path: Path,
) -> None:
    """GetResults' rows moved to a rowid table (cheaper for rows of a kilobyte): a file made before
    keeps every row, still readable, and its expiry index."""
    path = tmp_path / "keys.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE outcomes (tenant TEXT NOT NULL, handle TEXT NOT NULL, entry TEXT NOT NULL, "
            "data BLOB NOT NULL, expires REAL NOT NULL, PRIMARY KEY (tenant, handle, entry)) WITHOUT ROWID"
        )
        db.execute("CREATE INDEX outcomes_expiry ON outcomes (expires)")
        rows = [("acme", "h", str(entry), b"row %d" % entry, time.time() + 60) for entry in range(3)]
        db.executemany(
            "INSERT INTO outcomes VALUES (?, ?, ?, ?, ?)", [*rows, ("acme", "old", "0", b"x", 1.0)]
        )
    host_results.create(str(path), private_folder=False)
    host_results.create(str(path), private_folder=False)  # again: as it was
    with sqlite3.connect(path) as db:
        (table,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'outcomes'").fetchone()
        indexes = db.execute("SELECT name FROM pragma_index_list('outcomes')").fetchall()
        assert db.execute("SELECT count(*) FROM outcomes").fetchone() == (4,)
    assert "WITHOUT ROWID" not in table.upper()
    assert ("outcomes_expiry",) in indexes
    store = HostResults(str(path), ttl=60.0, lease=60.0)
    try:
        assert sorted(await store.read("acme", "h")) == [b"row 0", b"row 1", b"row 2"]
        await store.record([("acme", "h", "1", b"row 1 again"), ("acme", "h", "3", b"row 3")])
        assert sorted(await store.read("acme", "h")) == [b"row 0", b"row 1 again", b"row 2", b"row 3"]
        assert await store.beat() == 1  # the expired row, by the index
    finally:
        await store.stop()


def test_the_host_file_is_the_setting_or_a_private_folder_named_by_the_port(tmp_path: Path) -> None:
    def keys_file(folder: str = "", **values: Any) -> str:
        settings = Settings.from_env({}, tenants_file="t", **values)
        return host_results.keys_file(settings.state, settings.listen.grpc_port, folder)

    assert keys_file("/run/x", idempotency_file="/k.db") == "/k.db"
    default = keys_file(grpc_address="0.0.0.0:50051")
    assert default == os.path.join(tempfile.gettempdir(), "canvas-gateway-50051", "keys.sqlite3")
    # Port 0 is not found again by a restart: the supervisor's folder, or one process's memory.
    assert keys_file("/run/x", grpc_address="127.0.0.1:0") == "/run/x/keys.sqlite3"
    assert keys_file(grpc_address="127.0.0.1:0") == ""

    private = tmp_path / "canvas-gateway-1"
    host_results.create(str(private / "keys.sqlite3"), private_folder=True)
    assert private.stat().st_mode & 0o777 == 0o700
    with sqlite3.connect(private / "keys.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    host_results.create(str(private / "keys.sqlite3"), private_folder=True)  # again: as it was
    private.chmod(0o777)  # another local user could read or forge what is kept
    with pytest.raises(ConfigError, match="closed to others"):
        host_results.create(str(private / "keys.sqlite3"), private_folder=True)


# --- this process's memory ---------------------------------------------------------------------


async def test_the_local_store_forgets_by_ttl_in_the_background_and_a_stale_claim_is_lost() -> None:
    clock = Clock(0.0)
    store = LocalResults(ttl=10.0, capacity=100, lease=5.0, clock=clock)
    await store.claim(Scope("acme", "k"), 0, "d", "t0")
    await store.claim(Scope("acme", "k"), 3, "d", "t0")
    assert await store.mark_sending(Scope("acme", "k"), 0, "t0")  # its call may have left; 3's never did
    clock.now = 6.0  # past the lease, within the TTL
    assert (await store.claim(Scope("acme", "k"), 3, "d", "t3")).verdict is Verdict.RECLAIMED
    assert not await store.mark_sending(Scope("acme", "k"), 3, "t0")
    await store.keep(Scope("acme", "k"), 3, "d", "t3", None)  # released by the claim that holds it now
    assert (await store.claim(Scope("acme", "k"), 0, "d", "t0")).verdict is Verdict.LOST
    assert (await store.claim(Scope("acme", "k"), 0, "d", "t0")).verdict is Verdict.KEPT
    clock.now = 8.0
    await store.claim(Scope("acme", "k"), 1, "d", "t1")  # in flight until its TTL
    await store.keep(Scope("acme", "k"), 2, "d", "t2", b"r")
    clock.now = 17.0
    assert store.expire() == 1 and len(store) == 2  # the LOST one, never used again
    assert (await store.claim(Scope("acme", "k"), 2, "d", "t0")).verdict is Verdict.KEPT
    clock.now = 30.0
    store.start()  # the sweep frees the rest, though no key is used again
    try:
        for _ in range(100):
            if not len(store):
                break
            await asyncio.sleep(0.05)
    finally:
        await store.stop()
    assert len(store) == 0 and store.held("acme") == 0
    assert (await store.claim(Scope("acme", "k"), 1, "d", "t0")).verdict is Verdict.CLAIMED


async def test_the_local_store_evicts_the_oldest_result_of_the_biggest_tenant_never_a_claim() -> None:
    evicted: list[str] = []
    store = LocalResults(ttl=60.0, capacity=10, lease=60.0, on_evict=evicted.append)
    for index in range(3):  # globex: 3 results, within its share
        await store.claim(Scope("globex", "g"), index, "d", "t")
        await store.keep(Scope("globex", "g"), index, "d", "t", b"r")
    for index in range(4):  # acme: 4 claims in flight
        await store.claim(Scope("acme", "busy"), index, "d", "t")
    for index in range(100):  # acme's heavy traffic
        await store.claim(Scope("acme", "k"), index, "d", "t")
        await store.keep(Scope("acme", "k"), index, "d", "t", b"r")
    assert len(store) == 10 and evicted == ["acme"] * 97
    assert (store.held("globex"), store.held("acme")) == (3, 7)
    for index in range(3):  # none of globex's went
        assert (await store.claim(Scope("globex", "g"), index, "d", "t")).verdict is Verdict.KEPT
    for index in range(4):  # nor any claim in flight
        assert (await store.claim(Scope("acme", "busy"), index, "d", "t")).verdict is Verdict.BUSY
    assert [(await store.claim(Scope("acme", "k"), i, "d", "t")).verdict for i in (99, 97, 96)] == [
        Verdict.KEPT,
        Verdict.KEPT,
        Verdict.CLAIMED,  # evicted: the oldest went first
    ]
    # More claims in flight than the capacity: results go, every claim stays (the store holds
    # more than its capacity while they are in flight).
    for index in range(20):
        await store.claim(Scope("initech", "k"), index, "d", "t")
    assert (store.held("initech"), store.held("acme"), store.held("globex")) == (20, 5, 0)
    assert (await store.claim(Scope("initech", "k"), 0, "d", "t")).verdict is Verdict.BUSY


def test_an_entry_of_the_local_store_is_about_half_a_kilobyte() -> None:
    """The measured size behind the default capacity (settings, deploy/k8s' memory limit)."""
    store = LocalResults(ttl=60.0, capacity=10**6, lease=60.0)
    sent = BatchResult(0, tuple(range(50)), Outcome.SENT, Code.OK, "", dispatch_id=uuid.uuid4().hex)
    count = 5000

    async def fill() -> None:
        for index in range(count):
            scope, token = Scope("acme", f"order-{index // 20:08d}.a"), uuid.uuid4().hex
            await store.claim(scope, index % 20, uuid.uuid4().hex, token)
            await store.keep(scope, index % 20, uuid.uuid4().hex, token, encode(sent))

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        asyncio.run(fill())
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert len(store) == count
    assert 300 < per_entry < 800, per_entry  # orjson's 4 KB buffer, kept as is, made it 4.5 KB
    assert State().idempotency_capacity * per_entry < 40 * 2**20  # the default fits the memory limit


async def test_the_local_store_counts_each_entry_once_whatever_replaces_it() -> None:
    clock = Clock(0.0)
    store = LocalResults(ttl=10.0, capacity=100, lease=5.0, clock=clock)
    await store.stop()  # never started: nothing to stop
    await store.keep(Scope("acme", "k"), 0, "d", "t0", b"first")
    await store.keep(Scope("acme", "k"), 1, "d", "t0", b"other")
    await store.keep(Scope("acme", "k"), 0, "d", "t1", b"again")  # kept twice: one entry, the later result
    await store.keep(Scope("globex", "k"), 0, "d", "t0", b"r")
    assert (store.held("acme"), len(store)) == (2, 3)
    assert (await store.claim(Scope("acme", "k"), 0, "d", "t2")).kept == b"again"
    clock.now = 11.0  # expired, not swept yet: a claim takes its place
    assert (await store.claim(Scope("acme", "k"), 1, "d", "t3")).verdict is Verdict.CLAIMED
    assert (await store.claim(Scope("acme", "k"), 0, "d", "t3")).verdict is Verdict.CLAIMED
    assert (store.held("acme"), len(store)) == (2, 3)
    await store.keep(Scope("initech", "k"), 0, "d", "t0", b"r")  # kept at 11: not expired at 15
    clock.now = 15.0
    assert store.expire() == 1 and (store.held("globex"), store.held("initech")) == (0, 1)


async def test_a_lost_or_cut_off_batch_is_counted_once_when_decided_and_its_replays_apart() -> None:
    """No call reports these outcomes to the metrics: a lost batch's gateway stopped, a cut-off
    batch's caller went away. They are counted when decided; a repeat that gets them is a replay."""
    clock = Clock(0.0)
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, version="test", git_commit="test")
    ledger = Ledger(LocalResults(ttl=60.0, capacity=10, lease=5.0, clock=clock), metrics, lease=LEASE)
    tenant = Tenant("acme", "http://127.0.0.1:1", "k")

    def count(name: str, outcome: str) -> float:
        return registry.get_sample_value(name, {"tenant": "acme", "outcome": outcome}) or 0.0

    lost, cut = Batch(0, tuple(range(50)), b"{}"), Batch(1, tuple(range(50, 60)), b"{}")
    never_kept = await ledger.claim(Scope(tenant.id, "k"), lost)
    assert isinstance(never_kept, Claimed)
    assert await ledger.sending(never_kept) is None  # its call left, then its gateway died
    claimed = await ledger.claim(Scope(tenant.id, "k"), cut)
    assert isinstance(claimed, Claimed)
    ledger.keep_soon(claimed, sent=True)  # its caller went away while Braze was being called
    await ledger.settled(5.0)
    clock.now = 6.0  # past the lost one's lease
    for _ in range(3):
        for batch in (lost, cut):
            result = await ledger.claim(Scope(tenant.id, "k"), batch)
            assert isinstance(result, BatchResult) and result.replayed
            assert result.outcome is Outcome.UNKNOWN
            metrics.result(tenant.id, result)  # as the dispatcher reports each result it hands back

    assert count("canvas_gateway_recipients_total", "unknown") == 60  # each once
    assert count("canvas_gateway_replayed_recipients_total", "unknown") == 3 * 60


class Unanswering:
    """A store whose `keep` does not answer until `answering` (as a Redis slower than its
    timeout), then is `LocalResults`; it counts the keeps and how many overlapped."""

    def __init__(self) -> None:
        self.store = LocalResults(ttl=60.0, capacity=1000, lease=60.0)
        self.answering = False
        self.keeps = 0
        self.overlapping = 0
        self._now = 0

    async def claim(self, scope: Scope, index: int, digest: str, token: str) -> Claim:
        return await self.store.claim(scope, index, digest, token)

    async def mark_sending(self, scope: Scope, index: int, token: str) -> bool:
        return await self.store.mark_sending(scope, index, token)

    async def keep(self, scope: Scope, index: int, digest: str, token: str, kept: bytes | None) -> None:
        self.keeps += 1
        self._now += 1
        self.overlapping = max(self.overlapping, self._now)
        try:
            await asyncio.sleep(0)
            if not self.answering:
                raise StoreUnavailable("the shared results store (Redis) did not answer (TimeoutError)")
            await self.store.keep(scope, index, digest, token, kept)
        finally:
            self._now -= 1


TENANT = Tenant(id="acme", braze_rest_url="http://127.0.0.1:1", braze_api_key="k")


def waiting(ledger: Ledger) -> int:
    return ledger.backlog


async def test_what_the_store_did_not_take_is_offered_again_by_one_task_backing_off() -> None:
    store = Unanswering()
    ledger = Ledger(store, lease=60.0, jitter=lambda: 0.0)  # delays 0.1, 0.2, 0.4, 0.8 s...
    claims = []
    for index in range(50):
        claimed = await ledger.claim(Scope(TENANT.id, "k"), Batch(index, (index,), b"body"))
        assert isinstance(claimed, Claimed)
        claims.append(claimed)
    for claimed in claims:  # 50 releases the store does not take
        await ledger.keep(claimed, results.not_attempted(claimed.batch, "unsent", Code.UNAVAILABLE))
    assert ledger.backlog == 50 and store.keeps >= 50
    tried = store.keeps
    await asyncio.sleep(1.0)
    assert store.keeps - tried <= 4  # backing off: about 0.1 + 0.2 + 0.4 s, not 50 a second
    store.answering = True
    async with asyncio.timeout(5):
        while ledger.backlog:
            await asyncio.sleep(0.01)
    assert store.overlapping == 1  # one at a time
    again = await ledger.claim(Scope(TENANT.id, "k"), Batch(0, (0,), b"body"))
    assert isinstance(again, Claimed)  # released


async def test_what_the_store_never_takes_lapses_after_the_lease_and_shutdown_stops_trying() -> None:
    clock = Clock(0.0)
    store = Unanswering()
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, version="test", git_commit="test")
    ledger = Ledger(store, metrics, lease=5.0, clock=clock, jitter=lambda: 0.0)

    def logged(reason: str) -> float:  # results logged at ERROR for reconciliation
        found = registry.get_sample_value(
            "canvas_gateway_reconciliation_results_total", {"tenant": "acme", "reason": reason}
        )
        return found or 0.0

    claimed = await ledger.claim(Scope(TENANT.id, "k"), Batch(0, (0,), b"body"))
    assert isinstance(claimed, Claimed)
    await ledger.keep(claimed, results.not_attempted(claimed.batch, "unsent", Code.UNAVAILABLE))
    assert (logged("not_kept"), logged("never_kept")) == (1, 0)
    tried = store.keeps
    await until(lambda: store.keeps > tried)  # one more try, after the first delay
    clock.now = 6.0  # past the lease: dropped at its next turn
    async with asyncio.timeout(5):
        while ledger.backlog:
            await asyncio.sleep(0.01)
    assert (logged("not_kept"), logged("never_kept")) == (1, 1)  # each try is not a new line
    ledger.keep_soon(claimed, sent=True)  # UNKNOWN to keep, still not taken
    await ledger.settled(0.3)
    assert waiting(ledger) == 1  # left to lapse with its claim


def test_a_mismatch_says_what_became_of_the_batch_under_the_key() -> None:
    batch = Batch(3, (150, 151), b"body")
    unknown = encode(results.from_reply(batch, Reply(Delivery.UNKNOWN, failure="TimeoutError"), 1))
    assert describe(unknown) == "that batch of 2 recipients ended UNKNOWN: it may have been sent"
    assert "ended UNKNOWN (its gateway stopped" in describe(b"")
    assert describe(None) == "that batch is being sent by another call now"
    assert decode(unknown, batch).outcome is Outcome.UNKNOWN
    assert decode(b"", batch).outcome is Outcome.UNKNOWN  # LOST
    refused = encode(results.from_reply(batch, Reply(Delivery.RESPONDED, status=401), 1))  # kept by 0.x
    assert describe(refused) == "that batch of 2 recipients ended REJECTED"


class Unmarkable(Unanswering):
    """Claims answer; the mark that a call leaves raises `failure`."""

    def __init__(self, failure: Exception) -> None:
        super().__init__()
        self.failure = failure

    async def mark_sending(self, scope: Scope, index: int, token: str) -> bool:
        raise self.failure


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (StoreUnavailable("the shared results store (Redis) did not answer (TimeoutError)"), 14),
        (StoreLost("lost"), 9),
    ],
)
async def test_a_batch_whose_mark_fails_is_not_sent(failure: Exception, code: int) -> None:
    ledger = Ledger(Unmarkable(failure), lease=LEASE)
    claimed = await ledger.claim(Scope(TENANT.id, "k"), Batch(0, (0,), b"body"))
    assert isinstance(claimed, Claimed)
    unsent = await ledger.sending(claimed)
    assert unsent is not None and (unsent.outcome, int(unsent.code)) == (Outcome.NOT_ATTEMPTED, code)
    assert "nothing was sent" in unsent.status_message


async def test_redis_found_empty_refuses_keys_in_every_gateway_until_the_loss_is_accepted() -> None:
    async with redis_server() as server:
        client = connect(server.url, 1.0)
        early, registry = RedisResults(client, 60.0, 60.0), CollectorRegistry()
        early_metrics = PrometheusMetrics(registry, version="t", git_commit="t")
        watching = RedisResults(client, 60.0, 60.0, early_metrics)
        try:
            assert (
                await early.claim(Scope("acme", "k"), 0, "d", "t0")
            ).verdict is Verdict.CLAIMED  # no start()
            await watching.beat()
            assert watching.generation == early.generation != ""
            await client.call("FLUSHALL")  # as a restart without its data
            with pytest.raises(StoreLost, match="lost what it kept"):
                await early.mark_sending(Scope("acme", "k"), 0, "t0")  # found by the mark itself
            await watching.beat()  # the others see it with their heartbeat
            assert watching.lost and registry.get_sample_value("canvas_gateway_shared_store_lost_total") == 1
            with pytest.raises(StoreLost):
                await watching.claim(Scope("acme", "k"), 1, "d", "t1")  # refused without a round trip
            newcomer = RedisResults(client, 60.0, 60.0)
            with pytest.raises(StoreLost):  # a gateway started after the loss refuses too
                await newcomer.claim(Scope("acme", "k"), 1, "d", "t1")

            assert (await acknowledge_loss(client)).startswith("acknowledged")
            assert (await acknowledge_loss(client)).startswith("no loss")
            for store in (early, watching, newcomer):
                await store.beat()
                assert not store.lost
            assert registry.get_sample_value("canvas_gateway_idempotency_keys_refused") == 0
            assert (await newcomer.claim(Scope("acme", "k"), 1, "d", "t1")).verdict is Verdict.CLAIMED

            await client.call("SET", "cgw:generation", "another")  # a gateway started on an emptied Redis
            with pytest.raises(StoreLost):
                await early.claim(Scope("acme", "k"), 2, "d", "t2")
            await newcomer.beat()
            assert newcomer.lost  # flagged for every gateway
        finally:
            await client.aclose()


async def test_many_operations_at_once_share_one_connection_and_all_are_answered() -> None:
    """300 keyed batches in flight: every claim is answered, over the process's one connection
    (redis-py's default pool refused operations past its 100 connections, "Too many connections")."""
    async with redis_server() as server:
        client = connect(server.url, 2.0)
        store = RedisResults(client, ttl=60.0, lease=60.0)
        try:
            verdicts = await asyncio.gather(
                *(store.claim(Scope("acme", "many"), index, "d", f"t{index}") for index in range(300))
            )
            assert {claim.verdict for claim in verdicts} == {Verdict.CLAIMED}
            clients = (await client.call("INFO", "clients")).decode()
            assert "connected_clients:1\r\n" in clients
        finally:
            await client.aclose()
