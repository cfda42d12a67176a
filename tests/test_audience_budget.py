"""Calls with an `audience` and recipients: which Braze budget they draw on is a per-tenant
choice (CONTRACT.md 8, point 21), and a spent audience budget never pauses plain sends."""

from __future__ import annotations

from pathlib import Path

import pytest
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server.errors import ConfigError
from canvas_gateway_server.planning import Intake
from canvas_gateway_server.tenants import parse_tenant
from fake_braze import FakeBrazeConfig
from support import KEYS, Harness, standing_clock

AUDIENCE = pb.Audience(
    custom_attribute=pb.CustomAttributeFilter(custom_attribute_name="tier", comparison="equals")
)
AUDIENCE.custom_attribute.value.string_value = "gold"
STILL = standing_clock()
"""The fake's minute windows and the gateway's clock stand still: no minute turns during a test."""
SAFER_READING = FakeBrazeConfig(
    api_keys=frozenset(KEYS.values()),
    broadcast_per_minute_per_audience=2,
    audience_calls_on_broadcast_budget=True,
    clock=STILL,
)


def _request(count: int, audience: pb.Audience | None = None) -> pb.SendRequest:
    recipients = [pb.Recipient(external_user_id=f"u{i}") for i in range(count)]
    trigger = pb.CanvasTrigger(canvas_id="c", recipients=recipients, audience=audience)
    return pb.SendRequest(trigger=trigger)


@pytest.mark.parametrize(("fake_config", "clock"), [(SAFER_READING, STILL)])
@pytest.mark.parametrize("settings_overrides", [{"max_retry_wait_seconds": 0.5, "request_concurrency": 1}])
async def test_a_spent_audience_budget_pauses_audience_calls_only(harness: Harness) -> None:
    reply = await harness.stub.Send(_request(200, AUDIENCE), metadata=harness.auth("globex"))
    outcomes = [(r.outcome, r.code) for r in reply.results]
    assert outcomes[:2] == [(pb.OUTCOME_SENT, 0)] * 2  # 2 a minute for this audience
    assert outcomes[2:] == [(pb.OUTCOME_REJECTED, 8)] * 2  # RESOURCE_EXHAUSTED
    assert [r.attempts for r in reply.results[2:]] == [0, 0]  # remaining 0 said so: no 429 needed
    assert len(harness.fake.calls) == 2
    plain = await harness.stub.Send(_request(60), metadata=harness.auth("globex"))
    assert [r.outcome for r in plain.results] == [pb.OUTCOME_SENT] * 2  # the hourly pool is not paused
    again = await harness.stub.Send(_request(10, AUDIENCE), metadata=harness.auth("globex"))
    assert again.results[0].attempts == 0  # the audience budget still is


def test_the_budget_choice_is_read_from_the_tenants_file() -> None:
    entry = {
        "token_sha256": ["0" * 64],
        "braze_rest_url": "https://rest.iad-01.braze.com",
        "braze_api_key": "k",
    }
    for extra, expected in (({}, "any_audience"), ({"audience_budget": "broadcast_only"}, "broadcast_only")):
        tenant, _ = parse_tenant("t", entry | extra, {}, Path("."))
        assert tenant.audience_budget == expected
    with pytest.raises(ConfigError, match="audience_budget must be one of any_audience, broadcast_only"):
        parse_tenant("t", entry | {"audience_budget": "sometimes"}, {}, Path("."))


@pytest.mark.parametrize(
    ("audience_budget", "audience", "on_broadcast_budget"),
    [
        ("any_audience", True, True),
        ("broadcast_only", True, False),
        ("any_audience", False, False),
    ],
)
def test_which_batches_draw_on_the_broadcast_budget(
    audience_budget: str, audience: bool, on_broadcast_budget: bool
) -> None:
    head = {
        "canvas_id": "c",
        **(
            {"audience": {"custom_attribute": {"custom_attribute_name": "a", "comparison": "exists"}}}
            if audience
            else {}
        ),
    }
    intake = Intake(head, "context", audience_budget)
    for i in range(50):
        taken = intake.take({"external_user_id": f"u{i}"})
    assert taken.closed is not None and taken.closed.broadcast is on_broadcast_budget


def _broadcast(audience: pb.Audience) -> pb.SendRequest:
    return pb.SendRequest(trigger=pb.CanvasTrigger(canvas_id="c", broadcast=True, audience=audience))


@pytest.mark.parametrize(("fake_config", "clock"), [(SAFER_READING, STILL)])
@pytest.mark.parametrize("settings_overrides", [{"max_retry_wait_seconds": 0.5}])
async def test_an_audience_at_its_bucket_does_not_pause_broadcasts_to_others(harness: Harness) -> None:
    """Braze: 10 a minute per unique audience (2 at this fake) beside 250 for the workspace
    (CONTRACT.md 8, point 18). The third broadcast to one audience is refused here, without a call;
    a broadcast to another audience of the same tenant still goes."""
    replies = [
        await harness.stub.Send(_broadcast(AUDIENCE), metadata=harness.auth("globex")) for _ in range(3)
    ]
    assert [r.results[0].outcome for r in replies] == [pb.OUTCOME_SENT] * 2 + [pb.OUTCOME_REJECTED]
    assert replies[2].results[0].attempts == 0  # the audience's remaining 0 said so: no 429
    other = pb.Audience()
    other.CopyFrom(AUDIENCE)
    other.custom_attribute.value.string_value = "silver"
    again = await harness.stub.Send(_broadcast(other), metadata=harness.auth("globex"))
    assert again.results[0].outcome == pb.OUTCOME_SENT
    assert [call.status for call in harness.fake.calls] == [201, 201, 201]
