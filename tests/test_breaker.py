"""The circuit breaker per Braze URL: an instance that keeps failing is left alone for a
cool-down instead of being called harder, and one probe closes it again."""

from __future__ import annotations

import asyncio

import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server.breaker import LocalBreaker, State
from canvas_gateway_server.reply import Delivery, Reply
from fake_braze import Fault
from google.rpc import error_details_pb2
from support import FAKE_URLS, Clock, Harness

URL = "https://rest.iad-01.braze.com"
ANSWER = {status: Reply(Delivery.RESPONDED, status=status) for status in (201, 400, 429, 500, 503)}
NO_CONNECTION = Reply(Delivery.NOT_SENT, failure="ClientConnectorError")
TIMED_OUT = Reply(Delivery.UNKNOWN, failure="TimeoutError")


def _breaker(clock: Clock, changes: list[tuple[str, State]]) -> LocalBreaker:
    return LocalBreaker(3, 10.0, lambda host, state: changes.append((host, state)), clock)


def test_consecutive_failures_open_the_circuit_and_a_probe_closes_it() -> None:
    clock = Clock()
    changes: list[tuple[str, State]] = []
    breaker = _breaker(clock, changes)
    for reply in (NO_CONNECTION, TIMED_OUT, ANSWER[201], ANSWER[500], ANSWER[503]):
        assert breaker.blocked_until(URL) == 0
        breaker.record(URL, reply)  # the answer in the middle resets the count
    assert breaker.blocked_until(URL) == 0 and changes == []
    breaker.record(URL, NO_CONNECTION)  # the third in a row
    assert changes == [("rest.iad-01.braze.com", State.OPEN)]
    assert breaker.blocked_until(URL) == 1_010.0
    assert breaker.blocked_until("https://rest.fra-01.braze.eu") == 0  # one circuit per URL
    clock.now = 1_010.0
    assert breaker.blocked_until(URL) == 0  # the probe goes
    assert breaker.blocked_until(URL) == 1_020.0  # and only it, while it is under way
    breaker.record(URL, ANSWER[429])  # any answer below 500 shows Braze up
    assert [state for _, state in changes] == [State.OPEN, State.HALF_OPEN, State.CLOSED]
    assert breaker.blocked_until(URL) == 0


def test_a_failed_probe_opens_the_circuit_again_and_a_lost_probe_is_replaced() -> None:
    clock = Clock()
    changes: list[tuple[str, State]] = []
    breaker = _breaker(clock, changes)
    for _ in range(3):
        breaker.record(URL, ANSWER[503])
    clock.now += 10
    assert breaker.blocked_until(URL) == 0
    breaker.record(URL, TIMED_OUT)
    assert [state for _, state in changes] == [State.OPEN, State.HALF_OPEN, State.OPEN]
    assert breaker.blocked_until(URL) == clock.now + 10
    clock.now += 10
    assert breaker.blocked_until(URL) == 0  # a probe that never reports back...
    clock.now += 10
    assert breaker.blocked_until(URL) == 0  # ...is replaced after a cool-down
    breaker.record(URL, ANSWER[400])
    assert changes[-1][1] is State.CLOSED


BREAKER = {"breaker_failures": 3, "breaker_cooldown_seconds": 0.5, "request_concurrency": 1}


def _request(count: int) -> pb.SendRequest:
    recipients = [pb.Recipient(external_user_id=f"u{i}") for i in range(count)]
    return pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", recipients=recipients))


@pytest.mark.parametrize("settings_overrides", [BREAKER])
async def test_a_failing_braze_is_left_alone_then_probed(harness: Harness) -> None:
    harness.fake.faults.script([Fault.status(503)] * 3)
    reply = await harness.stub.Send(_request(300), metadata=harness.auth())
    outcomes = [(r.outcome, r.code, r.retryable) for r in reply.results]
    unavailable = (pb.OUTCOME_NOT_ATTEMPTED, 14, True)
    assert outcomes == [(pb.OUTCOME_UNKNOWN, 2, False)] * 3 + [unavailable] * 3
    assert len(harness.fake.calls) == 3  # the last three batches were not sent
    assert "circuit breaker open" in reply.results[3].status_message
    retry_info = error_details_pb2.RetryInfo()
    (detail,) = reply.results[3].details
    assert detail.Unpack(retry_info) and 0 < retry_info.retry_delay.seconds <= 1  # the cool-down's end
    assert all(r.attempts == 0 for r in reply.results[3:])
    host = FAKE_URLS[id(harness.fake)].split("//")[1]
    registry = harness.gateway.registry
    assert registry.get_sample_value("canvas_gateway_braze_breaker_state", {"braze_host": host}) == 1
    assert registry.get_sample_value("canvas_gateway_braze_breaker_opened_total", {"braze_host": host}) == 1

    await asyncio.sleep(0.6)  # the cool-down is over: the next call is a probe, and Braze is back
    again = await harness.stub.Send(_request(120), metadata=harness.auth())
    assert [r.outcome for r in again.results] == [pb.OUTCOME_SENT] * 3
    assert registry.get_sample_value("canvas_gateway_braze_breaker_state", {"braze_host": host}) == 0
