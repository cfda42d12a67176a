"""The caller's deadline bounds every batch: results come back in time, never silence."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from fake_braze import FakeBrazeConfig, Fault
from support import KEYS, Harness, standing_clock

ONE_BY_ONE = {"request_concurrency": 1}


def _request(count: int) -> pb.SendRequest:
    recipients = [pb.Recipient(external_user_id=f"u{i}") for i in range(count)]
    return pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", recipients=recipients))


@pytest.mark.parametrize("settings_overrides", [ONE_BY_ONE])
async def test_no_batch_starts_that_the_deadline_leaves_no_time_for(harness: Harness) -> None:
    harness.fake.faults.set_latency(0.5)
    started = time.monotonic()
    reply = await harness.stub.Send(_request(200), metadata=harness.auth(), timeout=1.25)
    assert time.monotonic() - started < 1.25  # an answer, not DEADLINE_EXCEEDED
    outcomes = [(r.outcome, r.code) for r in reply.results]
    sent = outcomes.count((pb.OUTCOME_SENT, 0))
    # 0.5 s a call, one at a time: 2 fit (1 on a slow machine); the third would start with 0.15 s left
    assert sent == len(harness.fake.calls) in (1, 2)
    cut = pb.OUTCOME_NOT_ATTEMPTED, 4  # DEADLINE_EXCEEDED
    assert outcomes == [(pb.OUTCOME_SENT, 0)] * sent + [cut] * (4 - sent)
    assert all(r.retryable and r.attempts == 0 for r in reply.results[sent:])


async def test_a_call_under_way_is_cut_at_the_deadline_and_reported_unknown(harness: Harness) -> None:
    harness.fake.faults.script([Fault.delay(5.0)])
    started = time.monotonic()
    reply = await harness.stub.Send(_request(1), metadata=harness.auth(), timeout=1.0)
    assert time.monotonic() - started < 1.0
    (result,) = reply.results
    assert (result.outcome, result.attempts, result.retryable) == (pb.OUTCOME_UNKNOWN, 1, False)


STILL = standing_clock()


# The fake's window and the gateway's clock stand still: the hour cannot turn during the test.
@pytest.mark.parametrize(
    ("fake_config", "clock"),
    [(FakeBrazeConfig(api_keys=frozenset(KEYS.values()), hourly_limit=1, clock=STILL), STILL)],
)
@pytest.mark.parametrize("settings_overrides", [{"max_retry_wait_seconds": 7200}])
async def test_a_rate_limit_pause_past_the_deadline_is_not_waited_for(harness: Harness) -> None:
    first = await harness.stub.Send(_request(1), metadata=harness.auth())  # spends the hour's budget
    assert first.results[0].outcome == pb.OUTCOME_SENT
    started = time.monotonic()
    reply = await harness.stub.Send(_request(1), metadata=harness.auth(), timeout=2.0)
    assert time.monotonic() - started < 1.0  # the pause lasts to the fake's next hour: not waited for
    (result,) = reply.results
    assert (result.outcome, result.code, result.attempts) == (pb.OUTCOME_REJECTED, 8, 0)  # RESOURCE_EXHAUSTED
    assert result.rate_limit_reset.seconds == (int(STILL()) // 3600 + 1) * 3600
    assert len(harness.fake.calls) == 1


@pytest.mark.parametrize("settings_overrides", [ONE_BY_ONE])
async def test_a_stream_s_batches_get_results_before_its_deadline(harness: Harness) -> None:
    harness.fake.faults.set_latency(0.4)

    async def messages() -> AsyncIterator[pb.SendStreamRequest]:
        yield pb.SendStreamRequest(header=pb.StreamHeader(trigger=pb.CanvasTrigger(canvas_id="c")))
        recipients = [pb.Recipient(external_user_id=f"u{i}") for i in range(250)]
        yield pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=recipients))

    responses = [r async for r in harness.stub.SendStream(messages(), metadata=harness.auth(), timeout=1.5)]
    results = [r.result for r in responses if r.HasField("result")]
    assert responses[-1].HasField("summary")
    assert sorted(p for r in results for p in r.positions) == list(range(250))
    sent = [r for r in results if r.outcome == pb.OUTCOME_SENT]
    assert len(sent) == len(harness.fake.calls) in (2, 3)
    assert all(r.outcome == pb.OUTCOME_NOT_ATTEMPTED and r.code == 4 for r in results if r not in sent)
