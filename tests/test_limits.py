"""Rate-limit headers and the per-tenant pause, without a server (an injected clock)."""

from __future__ import annotations

import json

from canvas_gateway_server.limits import MAX_PAUSE_SECONDS, LocalLimiter
from canvas_gateway_server.tenants import Tenant
from canvas_gateway_server.upstream import Delivery, RateLimit, Reply, parse_rate_limit
from conftest import EXAMPLES
from multidict import CIMultiDict

NOW = 1_750_192_867.0  # 2025-06-17T20:41:07Z, as in examples/response_429.headers.json
TENANT = Tenant(id="acme", braze_rest_url="https://rest.iad-01.braze.com", braze_api_key="k")


def reply(status: int, **rate: int | None) -> Reply:
    return Reply(Delivery.RESPONDED, status=status, rate=RateLimit(**rate))


def headers(name: str) -> CIMultiDict[str]:
    return CIMultiDict(json.loads((EXAMPLES / name).read_text()))


def test_braze_headers_as_recorded() -> None:
    rate = parse_rate_limit(headers("response_429.headers.json"), NOW)
    assert rate == RateLimit(limit=250_000, remaining=0, reset=1_750_194_000)
    assert (
        parse_rate_limit(headers("response_401.headers.json"), NOW) == RateLimit()
    )  # empty strings: unknown
    upper = CIMultiDict({"X-RateLimit-Remaining": "7"})  # aiohttp's headers match any case
    assert parse_rate_limit(upper, NOW).remaining == 7
    assert parse_rate_limit({"retry-after": "7"}, NOW).retry_after == 7.0
    assert parse_rate_limit({"x-ratelimit-retry-after": "3.5"}, NOW).retry_after == 3.5


def test_a_reset_that_is_not_epoch_seconds_near_now_is_unknown() -> None:
    for bad in ("1750194000000", "100000000000000000000", "9999999999", "1000000000", "soon"):
        assert parse_rate_limit({"x-ratelimit-reset": bad}, NOW).reset is None, bad
    assert parse_rate_limit({"x-ratelimit-reset": "1750194000"}, NOW).reset == 1_750_194_000


def test_a_spent_budget_pauses_until_the_reset_and_nothing_lifts_it_early() -> None:
    now = [NOW]
    limiter = LocalLimiter(4, clock=lambda: now[0])
    limiter.observe(TENANT, False, reply(201, remaining=0, reset=1_750_194_000))
    assert limiter.paused_until(TENANT, False) == 1_750_194_000
    assert limiter.paused_until(TENANT, True) == 0  # broadcasts have their own budget
    limiter.observe(TENANT, False, reply(503))  # no headers: says nothing about the budget
    limiter.observe(TENANT, False, reply(201, remaining=3, reset=1_750_194_000))  # a stale reply
    limiter.observe(TENANT, False, reply(429, remaining=5))
    assert limiter.paused_until(TENANT, False) == 1_750_194_000
    now[0] = 1_750_194_000.5  # the window has reset
    assert limiter.paused_until(TENANT, False) == 0


def test_a_pause_never_outlasts_an_hour() -> None:
    limiter = LocalLimiter(4, clock=lambda: NOW)
    limiter.observe(TENANT, False, reply(429, reset=9_999_999_999))
    assert limiter.paused_until(TENANT, False) == NOW + MAX_PAUSE_SECONDS
