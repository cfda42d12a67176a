"""The retry budget: in an outage a tenant's retries stay a bounded share of its calls."""

from __future__ import annotations

import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server.retry_budget import WINDOW, LocalRetryBudget
from fake_braze import Fault
from support import Clock, Harness


def test_retries_are_a_share_of_recent_calls_plus_a_minimum() -> None:
    clock = Clock(100.0)
    budget = LocalRetryBudget(ratio=0.5, minimum=1, clock=clock)
    assert budget.try_retry("acme")  # the minimum
    assert not budget.try_retry("acme")
    for _ in range(4):
        budget.called("acme")
    assert [budget.try_retry("acme") for _ in range(3)] == [True, True, False]  # 1 + 0.5 * 4 = 3
    assert budget.try_retry("globex")  # each tenant has its own
    clock.now += WINDOW  # the window moved past all of them
    assert budget.try_retry("acme") and not budget.try_retry("acme")


RETRIES = {"request_concurrency": 1, "max_attempts": 3, "retry_budget_ratio": 0.0, "retry_budget_minimum": 3}


@pytest.mark.parametrize("settings_overrides", [RETRIES])
async def test_an_outage_does_not_multiply_the_calls(harness: Harness) -> None:
    harness.fake.faults.script([Fault.status(429)] * 100)
    recipients = [pb.Recipient(external_user_id=f"u{i}") for i in range(250)]
    reply = await harness.stub.Send(
        pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", recipients=recipients)),
        metadata=harness.auth(),
    )
    assert [r.attempts for r in reply.results] == [3, 2, 1, 1, 1]  # 3 retries in all, not 10
    assert len(harness.fake.calls) == 8
    assert all(r.outcome == pb.OUTCOME_REJECTED and r.code == 8 and r.retryable for r in reply.results)
    denied = harness.gateway.registry.get_sample_value(
        "canvas_gateway_retries_denied_total", {"tenant": "acme"}
    )
    assert denied == 4
