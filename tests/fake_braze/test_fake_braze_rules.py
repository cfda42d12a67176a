"""Pure parts of the fake Braze: body rules, rate-limit counters and fault state. No server."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from canvas_gateway_server.braze import MAX_AUDIENCE_DEPTH, MAX_BODY_BYTES
from canvas_gateway_server.validate import check_audience as gateway_check_audience
from fake_braze import Fault, FaultError
from fake_braze.faults import Action, FaultState
from fake_braze.ratelimit import FixedWindow, RateLimiter, audience_key
from fake_braze.rules import (
    TOO_MANY_RECIPIENTS,
    check_audience,
    check_content_type,
    check_recipient,
    check_request,
    check_size,
    parse_json,
)

HOUR_START = 1_750_190_400.0  # 2025-06-17T20:00:00Z
SUB = {"push_subscription_status": {"comparison": "is", "value": "opted_in"}}


def chain(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = SUB
    for index in range(levels):
        node = {("AND", "OR")[index % 2]: [node]}
    return node


# --- rules ---------------------------------------------------------------------------------------


def test_size_limit_is_4_000_000_bytes() -> None:
    assert check_size(MAX_BODY_BYTES) is None
    rejection = check_size(MAX_BODY_BYTES + 1)
    assert rejection is not None
    assert rejection[0] == 413


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [("application/json", True), ("APPLICATION/JSON", True), ("text/json", False), ("", False)],
)
def test_content_type(content_type: str, ok: bool) -> None:
    assert (check_content_type(content_type) is None) is ok


def test_parse_json() -> None:
    assert parse_json(b'{"a": [1, 2.5, true, null]}') == ({"a": [1, 2.5, True, None]}, None)
    body, rejection = parse_json(b"{'a': 1}")
    assert body is None
    assert rejection is not None
    assert rejection[0] == 400
    too_deep = b"[" * 5000 + b"]" * 5000  # the parser's own depth limit also answers 400
    assert parse_json(too_deep)[1] is not None


def test_first_failing_rule_wins() -> None:
    payload = {"canvas_id": "", "recipients": [{"external_user_id": 1}] * 51}
    assert check_request(payload) == (400, "canvas_id must be a string of the Canvas api identifier")
    payload["canvas_id"] = "c"
    assert check_request(payload) == (400, TOO_MANY_RECIPIENTS)


def test_messages_name_the_recipient_index() -> None:
    recipients = [{"external_user_id": "a"}, {"external_user_id": "b"}, {"external_user_id": 3}]
    rejection = check_request({"canvas_id": "c", "recipients": recipients})
    assert rejection is not None
    assert "recipients[2].external_user_id" in rejection[1]


def test_check_recipient_alone() -> None:
    assert check_recipient({"user_alias": {"alias_name": "a", "alias_label": "b"}}) is None
    assert check_recipient({"email": "a@b.c"}) is not None


def test_audience_depth_guard() -> None:
    assert check_audience(chain(MAX_AUDIENCE_DEPTH)) is None
    rejection = check_audience(chain(MAX_AUDIENCE_DEPTH + 1))
    assert rejection is not None
    assert rejection[0] == 400
    # Far deeper than Python's recursion limit still answers 400 rather than crashing.
    assert check_audience(chain(50_000)) == rejection


@pytest.mark.parametrize("levels", range(MAX_AUDIENCE_DEPTH - 1, MAX_AUDIENCE_DEPTH + 3))
def test_audience_depth_line_is_the_gateways(levels: int) -> None:
    """The guard is the project's, not Braze's: the fake must refuse exactly what the gateway
    refuses, or an audience the gateway sends would come back 400 from the fake."""
    gateway_accepts = gateway_check_audience(chain(levels), "audience") == []
    assert (check_audience(chain(levels)) is None) is gateway_accepts


def test_context_size_counts_utf8_bytes() -> None:
    three_byte_chars = "€" * ((50_000 - 8) // 3)  # {"k":"..."} is 8 bytes of framing
    payload = {"canvas_id": "c", "broadcast": True, "context": {"k": three_byte_chars}}
    assert len(orjson.dumps(payload["context"])) <= 50_000
    assert check_request(payload) is None
    payload["context"] = {"k": three_byte_chars + "€"}
    assert check_request(payload) is not None


# --- rate limits ---------------------------------------------------------------------------------


def test_fixed_window_counts_and_resets_on_the_boundary() -> None:
    window = FixedWindow(limit=2, period=3600)
    first = window.hit("k", HOUR_START + 10)
    assert (first.allowed, first.remaining, first.reset) == (True, 1, int(HOUR_START) + 3600)
    assert window.hit("k", HOUR_START + 20).remaining == 0
    over = window.hit("k", HOUR_START + 3599.99)
    assert (over.allowed, over.remaining) == (False, 0)
    assert window.hit("other", HOUR_START + 30).allowed
    fresh = window.hit("k", HOUR_START + 3600)
    assert (fresh.allowed, fresh.remaining, fresh.reset) == (True, 1, int(HOUR_START) + 7200)
    window.reset()
    assert window.hit("k", HOUR_START + 3600).remaining == 1


def test_verdict_headers_are_lowercase_decimal_strings() -> None:
    verdict = FixedWindow(limit=5, period=60).hit("k", 120.5)
    assert verdict.headers() == {
        "x-ratelimit-limit": "5",
        "x-ratelimit-remaining": "4",
        "x-ratelimit-reset": "180",
    }


def test_rate_limiter_separates_pools() -> None:
    now = [HOUR_START]
    limiter = RateLimiter(lambda: now[0], 1, 3, 2)
    broadcast = {"canvas_id": "c", "broadcast": True}
    assert limiter.hit("k", {"canvas_id": "c", "recipients": []}).allowed
    assert not limiter.hit("k", None).allowed  # unparsable bodies count against the hourly pool
    assert limiter.hit("k", broadcast).allowed  # broadcasts have their own budgets
    assert limiter.hit("k", broadcast).limit == 2  # the tighter budget is reported
    assert not limiter.hit("k", broadcast).allowed  # per audience, 2/min
    limited = limiter.hit("k", {**broadcast, "canvas_id": "d"})
    assert (limited.allowed, limited.limit) == (False, 3)  # per key, 3/min
    now[0] += 60
    assert limiter.hit("k", broadcast).allowed
    limiter.reset()
    assert limiter.hit("k", None).allowed


def test_audience_key_ignores_key_order_only() -> None:
    assert audience_key("c", {"a": 1, "b": 2}) == audience_key("c", {"b": 2, "a": 1})
    assert audience_key("c", {"a": 1}) != audience_key("d", {"a": 1})
    assert audience_key("c", {"a": 1}) != audience_key("c", {"a": 2})


# --- faults -------------------------------------------------------------------------------------


def test_fault_builders() -> None:
    unavailable = Fault.status(503)
    assert (unavailable.action, unavailable.status_code) == (Action.STATUS, 503)
    assert orjson.loads(unavailable.body) == {"message": "Service Unavailable"}
    html = Fault.status(502, body=b"<html/>", content_type="text/html")
    assert (html.body, html.content_type) == (b"<html/>", "text/html")
    assert Fault.reset().action is Action.RESET
    assert Fault.delay(0.5) == Fault(Action.PROCEED, 0.5)
    assert Fault.delay_then_status(0.1, 504).delay_seconds == 0.1
    with pytest.raises(FaultError):
        Fault.status(600)
    with pytest.raises(FaultError):
        Fault.delay(-1)


@pytest.mark.parametrize(
    "spec",
    [
        {"status": 503},
        {"status": 502, "body": "<html>bad gateway</html>", "content_type": "text/html"},
        {"reset": True},
        {"reset": True, "delay_ms": 30},
        {"delay_ms": 2000},
        {"delay_ms": 100, "status": 504},
    ],
)
def test_fault_json_round_trip(spec: dict[str, Any]) -> None:
    fault = Fault.from_json(spec)
    assert Fault.from_json(fault.to_json()) == fault


def test_fault_state_script_comes_before_rates() -> None:
    state = FaultState(random.Random(1), {503: 1.0})
    state.script([Fault.reset(), Fault.delay(0.1)])
    assert state.next_fault() == Fault.reset()
    assert state.next_fault() == Fault.delay(0.1)
    assert state.next_fault() == Fault.status(503)
    state.clear()
    assert state.next_fault() is None
    assert state.to_json() == {"script": [], "rates": {}, "latency_ms": 0}


def test_fault_rates_follow_the_seed() -> None:
    def draws(seed: int) -> list[int]:
        state = FaultState(random.Random(seed), {500: 0.2, 503: 0.2}, reset_rate=0.2)
        return [getattr(state.next_fault(), "status_code", -1) for _ in range(500)]

    first = draws(3)
    assert first == draws(3)
    counts = {code: first.count(code) for code in (500, 503, 0, -1)}
    assert all(60 <= count <= 140 for code, count in counts.items() if code != -1)
    assert 160 <= counts[-1] <= 240  # about 40% answered normally


def test_apply_json_is_all_or_nothing() -> None:
    state = FaultState(random.Random(0), latency_seconds=0.01)
    with pytest.raises(FaultError):
        state.apply_json({"script": [{"status": 503}], "rates": {"503": 2}})
    assert state.to_json() == {"script": [], "rates": {}, "latency_ms": 10}
    state.apply_json({"script": [{"status": 503}], "rates": {"reset": 0.5}})
    state.apply_json({"script": [{"reset": True}]})  # appends; rates and latency kept
    assert state.to_json()["rates"] == {"reset": 0.5}
    assert [entry.get("status") for entry in state.to_json()["script"]] == [503, None]
