"""Every upstream outcome mapped to a result, through the real gateway and the fake Braze.

Only what cannot have sent anything is retried: 429 and connections that never opened.
5xx, timeouts and dropped connections come back UNKNOWN after exactly one call.

And, on the client itself: a call's `leaving` (the mark of a keyed batch) is asked once its
connection is in hand, after any wait for the pool, and a call it stops writes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc
from canvas_gateway_server.reply import Delivery
from canvas_gateway_server.tenants import Tenant
from canvas_gateway_server.upstream import STOPPED, BrazeClient, open_session
from fake_braze import FakeBraze, FakeBrazeConfig, Fault
from google.rpc import error_details_pb2
from support import FAKE_URLS, KEYS, TOKENS, Harness, standing_clock, trigger_from_json, until

BODY = {"canvas_id": "c-1", "recipients": [{"external_user_id": "u1"}, {"external_user_id": "u2"}]}


async def send_one(h: Harness, body: dict[str, Any] = BODY, tenant: str = "acme") -> pb.BatchResult:
    stub = pb_grpc.CanvasGatewayServiceStub(h.channel)  # typed for grpc.aio, unlike `Harness.stub`
    response = await stub.Send(
        pb.SendRequest(trigger=trigger_from_json(body)), metadata=h.auth(tenant), timeout=30
    )
    (result,) = response.results
    assert list(result.positions) == [0, 1]
    return result


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (401, grpc.StatusCode.INTERNAL),
        (403, grpc.StatusCode.PERMISSION_DENIED),
        (404, grpc.StatusCode.INTERNAL),
        (413, grpc.StatusCode.INVALID_ARGUMENT),
        (418, grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_refusals_are_rejected_with_the_matching_code_and_not_retried(
    harness: Harness, status: int, code: grpc.StatusCode
) -> None:
    harness.fake.faults.script([Fault.status(status)])
    result = await send_one(harness)
    assert result.outcome == pb.OUTCOME_REJECTED
    assert result.code == code.value[0]
    assert result.braze.http_status == status and result.attempts == 1 and not result.retryable
    assert "nothing was sent" in result.status_message
    assert len(harness.fake.calls) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_unknown_and_never_retried(harness: Harness, status: int) -> None:
    harness.fake.faults.script([Fault.status(status)])
    result = await send_one(harness)
    assert result.outcome == pb.OUTCOME_UNKNOWN
    assert result.code == grpc.StatusCode.UNKNOWN.value[0]
    assert result.braze.http_status == status and result.attempts == 1 and not result.retryable
    assert len(harness.fake.calls) == 1


async def test_non_json_error_page_is_tolerated(harness: Harness) -> None:
    harness.fake.faults.script([Fault.status(502, b"<html>bad gateway</html>", "text/html")])
    result = await send_one(harness)
    assert result.outcome == pb.OUTCOME_UNKNOWN and result.braze.message == "non-JSON response (text/html)"


async def test_dropped_connection_after_sending_is_unknown(harness: Harness) -> None:
    harness.fake.faults.script([Fault.reset()])
    result = await send_one(harness)
    assert result.outcome == pb.OUTCOME_UNKNOWN and result.braze.http_status == 0 and result.attempts == 1
    assert len(harness.fake.calls) == 1


@pytest.mark.parametrize("settings_overrides", [{"upstream_timeout_seconds": 0.3}])
async def test_timeout_is_unknown_and_not_retried(harness: Harness) -> None:
    harness.fake.faults.script([Fault.delay(1.0)])
    result = await send_one(harness)
    assert result.outcome == pb.OUTCOME_UNKNOWN and result.attempts == 1
    assert "TimeoutError" in result.status_message


async def test_429_is_retried_and_then_sent(harness: Harness) -> None:
    harness.fake.faults.script([Fault.status(429), Fault.status(429)])
    result = await send_one(harness)
    assert result.outcome == pb.OUTCOME_SENT and result.attempts == 3
    assert result.braze.dispatch_id == harness.fake.calls[-1].dispatch_id
    assert [c.status for c in harness.fake.calls] == [429, 429, 201]


async def test_429_past_the_last_attempt_is_rejected_as_retryable(harness: Harness) -> None:
    harness.fake.faults.script([Fault.status(429)] * 3)
    result = await send_one(harness)
    assert result.outcome == pb.OUTCOME_REJECTED
    assert result.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert result.retryable and result.attempts == 3


STILL = standing_clock()
"""The fake's window and the gateway's clock stand still: the hour cannot turn during a test."""


def next_clock_hour() -> int:
    """The reset of the fake's window, an hour or two ahead of the wall clock."""
    return (int(STILL()) // 3600 + 1) * 3600


@pytest.mark.parametrize(
    ("fake_config", "clock"),
    [(FakeBrazeConfig(api_keys=frozenset(KEYS.values()), hourly_limit=0, clock=STILL), STILL)],
)
async def test_a_429_with_a_distant_reset_is_rejected_with_the_reset_time(harness: Harness) -> None:
    result = await send_one(harness)
    assert result.outcome == pb.OUTCOME_REJECTED and result.retryable
    assert result.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert result.braze.http_status == 429 and result.attempts == 1
    assert result.rate_limit_reset.seconds == next_clock_hour()
    assert result.braze.message == "Rate Limited"
    retry, quota = result.details
    retry_info, quota_failure = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
    assert retry.Unpack(retry_info) and quota.Unpack(quota_failure)
    assert 0 < retry_info.retry_delay.seconds <= next_clock_hour() - time.time() + 1  # until the reset
    assert [v.subject for v in quota_failure.violations] == ["braze:recipients"]


@pytest.mark.parametrize(
    ("fake_config", "clock"),
    [(FakeBrazeConfig(api_keys=frozenset(KEYS.values()), hourly_limit=1, clock=STILL), STILL)],
)
async def test_a_spent_budget_pauses_the_tenant_until_its_reset(harness: Harness) -> None:
    first = await send_one(harness)  # accepted, with x-ratelimit-remaining: 0
    assert first.outcome == pb.OUTCOME_SENT
    second = await send_one(harness)  # so the gateway does not call Braze again before the reset
    assert second.outcome == pb.OUTCOME_REJECTED and second.retryable
    assert second.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert second.attempts == 0 and second.rate_limit_reset.seconds == next_clock_hour()
    assert [c.status for c in harness.fake.calls] == [201]
    other = await send_one(harness, tenant="globex")  # another tenant's budget is its own
    assert other.outcome == pb.OUTCOME_SENT


@pytest.mark.parametrize("settings_overrides", [{"max_attempts": 3}])
async def test_a_connection_that_never_opens_is_retried_then_not_attempted(harness: Harness) -> None:
    await harness.fake.stop()  # nothing listens on the tenant's URL any more
    result = await send_one(harness)
    assert result.outcome == pb.OUTCOME_NOT_ATTEMPTED
    assert result.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert result.retryable and result.attempts == 3 and result.braze.http_status == 0


@pytest.mark.parametrize("fake_config", [FakeBrazeConfig(api_keys=frozenset({KEYS["globex"]}))])
async def test_a_braze_key_never_reaches_results_errors_or_logs(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    result = await send_one(harness, tenant="acme")  # the fake does not know acme's key: 401 echoing it
    call = harness.fake.calls[0]
    assert call.status == 401 and call.api_key == KEYS["acme"]  # sent in the header only
    assert KEYS["acme"].encode() not in call.raw
    assert result.outcome == pb.OUTCOME_REJECTED and result.code == grpc.StatusCode.INTERNAL.value[0]
    assert result.braze.message == "Invalid API key: [REDACTED]"
    for secret in (KEYS["acme"], TOKENS["acme"]):
        assert secret.encode() not in result.SerializeToString()
        assert secret not in caplog.text


# --- a call's `leaving`, on the client itself ------------------------------------------------

RAW = orjson.dumps(BODY)


def acme(fake: FakeBraze) -> Tenant:
    return Tenant(id="acme", braze_rest_url=FAKE_URLS[id(fake)], braze_api_key=KEYS["acme"])


async def test_leaving_is_asked_once_the_call_has_its_pooled_connection(fake: FakeBraze) -> None:
    """With the pool's one connection busy, a call waits for it before its `leaving` is asked:
    a process that dies while it waits has marked nothing."""
    fake.faults.set_latency(0.3)
    asked: list[tuple[int, int]] = []

    async def leaving() -> bool:
        asked.append((fake.in_progress, len(fake.calls)))
        return True

    async with open_session(1) as session:
        client = BrazeClient(session, aiohttp.ClientTimeout(total=10))
        first = asyncio.ensure_future(client.trigger(acme(fake), RAW))
        await until(lambda: fake.in_progress == 1)
        second = await client.trigger(acme(fake), RAW, leaving=leaving)
        assert (await first).status == second.status == 201
    assert asked == [(0, 1)]  # once the first call was answered and its connection back


async def test_a_call_its_leaving_stops_writes_nothing_and_gives_its_connection_back(fake: FakeBraze) -> None:
    async def refuse() -> bool:
        return False

    asked = asyncio.Event()

    async def wait_forever() -> bool:
        asked.set()
        await asyncio.Event().wait()
        return True

    async with open_session(1) as session:
        client = BrazeClient(session, aiohttp.ClientTimeout(total=10))
        stopped = await client.trigger(acme(fake), RAW, leaving=refuse)
        assert (stopped.delivery, stopped.failure) == (Delivery.NOT_SENT, STOPPED)
        cancelled = asyncio.ensure_future(client.trigger(acme(fake), RAW, leaving=wait_forever))
        await asked.wait()
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert fake.arrived == []
        async with asyncio.timeout(5):  # the pool's one connection is free again
            assert (await client.trigger(acme(fake), RAW)).status == 201
    assert len(fake.arrived) == 1


async def test_a_call_cut_short_before_its_leaving_said_yes_is_not_sent(fake: FakeBraze) -> None:
    """Timed out while waiting for the pool, or while its `leaving` is asked (a slow mark): aiohttp
    does not say where its timeout struck, but nothing can have been written."""
    fake.faults.set_latency(1.0)

    async def never() -> bool:
        raise AssertionError("asked without a connection")

    async def slow() -> bool:
        await asyncio.sleep(5)
        return True

    async with open_session(1) as session:
        client = BrazeClient(session, aiohttp.ClientTimeout(total=10))
        busy = asyncio.ensure_future(client.trigger(acme(fake), RAW))
        await until(lambda: fake.in_progress == 1)
        waiting = await client.trigger(acme(fake), RAW, time_left=0.2, leaving=never)
        assert (await busy).status == 201
        asked = await client.trigger(acme(fake), RAW, time_left=0.2, leaving=slow)
    assert (waiting.delivery, asked.delivery, asked.failure) == (
        Delivery.NOT_SENT,
        Delivery.NOT_SENT,
        "TimeoutError",
    )
    assert len(fake.arrived) == 1  # the busy call's


async def test_on_a_session_of_its_own_leaving_is_asked_before_the_call(fake: FakeBraze) -> None:
    answers = [False, True]

    async def leaving() -> bool:
        return answers.pop(0)

    async with aiohttp.ClientSession() as session:
        client = BrazeClient(session, aiohttp.ClientTimeout(total=10))
        stopped = await client.trigger(acme(fake), RAW, leaving=leaving)
        assert (stopped.delivery, stopped.failure, fake.arrived) == (Delivery.NOT_SENT, STOPPED, [])
        assert (await client.trigger(acme(fake), RAW, leaving=leaving)).status == 201
