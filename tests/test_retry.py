"""The retry schedule, pure: which replies are called again, and after how long.

The numbers are powers of two so that every expected delay is exact in floating point.
"""

from __future__ import annotations

import pytest
from canvas_gateway_server.reply import Delivery, RateLimit, Reply
from canvas_gateway_server.retry import RetryPolicy, rate_limit_pause, rate_limit_wait, retry_delay
from canvas_gateway_server.settings import Retry

MIN_CALL = Retry().min_call_seconds  # the setting's default
POLICY = RetryPolicy(max_attempts=5, base_delay=0.25, max_delay=1.5, max_wait=10.0, min_time_left=MIN_CALL)
NOW = 1_000_000.0
ALMOST_ONE = 0.999  # jitter is in [0, 1)

NOT_SENT = Reply(Delivery.NOT_SENT, failure="connect")
UNKNOWN = Reply(Delivery.UNKNOWN, failure="timeout")


def rate_limited(retry_after: float | None = None, reset: int | None = None) -> Reply:
    return Reply(Delivery.RESPONDED, 429, rate=RateLimit(reset=reset, retry_after=retry_after))


@pytest.mark.parametrize("reply", [NOT_SENT, rate_limited(), rate_limited(retry_after=1.0)])
@pytest.mark.parametrize("attempts", [5, 6])
def test_no_retry_once_the_attempts_are_spent(reply: Reply, attempts: int) -> None:
    assert retry_delay(POLICY, reply, attempts, NOW, 0.0) is None


def test_the_last_attempt_before_the_limit_is_still_retried() -> None:
    assert retry_delay(POLICY, NOT_SENT, 4, NOW, 0.0) == 0.75
    assert retry_delay(POLICY, rate_limited(retry_after=1.0), 4, NOW, 0.0) == 1.0


@pytest.mark.parametrize(
    ("attempts", "backoff"),
    [(1, 0.25), (2, 0.5), (3, 1.0), (4, 1.5)],  # doubles from base_delay, capped at max_delay
)
def test_a_connection_never_opened_backs_off_doubling_up_to_the_cap(attempts: int, backoff: float) -> None:
    assert retry_delay(POLICY, NOT_SENT, attempts, NOW, 0.0) == backoff / 2
    assert retry_delay(POLICY, NOT_SENT, attempts, NOW, 0.5) == backoff * 0.75


def test_the_cap_holds_however_many_attempts_are_allowed() -> None:
    many = RetryPolicy(
        max_attempts=100,
        base_delay=0.25,
        max_delay=1.5,
        max_wait=Retry().max_wait_seconds,
        min_time_left=MIN_CALL,
    )
    assert retry_delay(many, NOT_SENT, 60, NOW, 0.0) == 0.75
    assert retry_delay(many, NOT_SENT, 60, NOW, 0.5) == 1.125


@pytest.mark.parametrize("attempts", [1, 2, 3, 4])
def test_backoff_jitter_spans_half_the_backoff_to_just_under_all_of_it(attempts: int) -> None:
    backoff = min(POLICY.max_delay, POLICY.base_delay * 2 ** (attempts - 1))
    lowest = retry_delay(POLICY, NOT_SENT, attempts, NOW, 0.0)
    highest = retry_delay(POLICY, NOT_SENT, attempts, NOW, ALMOST_ONE)
    assert lowest == backoff / 2
    assert highest is not None and backoff * 0.999 < highest < backoff


def test_a_429_waits_for_retry_after_plus_jitter_of_up_to_one_base_delay() -> None:
    assert retry_delay(POLICY, rate_limited(retry_after=3.0), 1, NOW, 0.0) == 3.0
    assert retry_delay(POLICY, rate_limited(retry_after=3.0), 1, NOW, 0.5) == 3.125
    # Unlike the connect backoff, the wait does not grow with the attempts.
    assert retry_delay(POLICY, rate_limited(retry_after=3.0), 3, NOW, 0.5) == 3.125


def test_retry_after_is_preferred_to_the_reset_time() -> None:
    reply = rate_limited(retry_after=2.0, reset=int(NOW) + 7)
    assert retry_delay(POLICY, reply, 1, NOW, 0.0) == 2.0


def test_without_retry_after_a_429_waits_until_the_reset_time() -> None:
    assert retry_delay(POLICY, rate_limited(reset=int(NOW) + 4), 1, NOW, 0.0) == 4.0
    assert retry_delay(POLICY, rate_limited(reset=int(NOW) + 4), 1, NOW + 0.5, 0.5) == 3.625


def test_a_reset_time_already_past_or_a_negative_retry_after_waits_only_the_jitter() -> None:
    assert retry_delay(POLICY, rate_limited(reset=int(NOW) - 30), 1, NOW, 0.0) == 0.0
    assert retry_delay(POLICY, rate_limited(retry_after=-5.0), 1, NOW, 0.5) == 0.125


@pytest.mark.parametrize(("attempts", "wait"), [(1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0)])
def test_without_rate_limit_headers_a_429_falls_back_to_a_doubling_wait(attempts: int, wait: float) -> None:
    # max_delay caps the connect backoff only; a 429's wait is bounded by max_wait.
    assert retry_delay(POLICY, rate_limited(), attempts, NOW, 0.0) == wait
    assert retry_delay(POLICY, rate_limited(), attempts, NOW, 0.5) == wait + 0.125


def test_a_wait_up_to_max_wait_is_taken_and_one_past_it_gives_up() -> None:
    assert retry_delay(POLICY, rate_limited(retry_after=10.0), 1, NOW, 0.0) == 10.0
    assert retry_delay(POLICY, rate_limited(retry_after=10.0), 1, NOW, 0.5) is None  # 10.125 with jitter
    assert retry_delay(POLICY, rate_limited(retry_after=3600.0), 1, NOW, 0.0) is None
    assert retry_delay(POLICY, rate_limited(reset=int(NOW) + 11), 1, NOW, 0.0) is None
    assert retry_delay(POLICY, rate_limited(reset=int(NOW) + 10), 1, NOW, 0.0) == 10.0


def test_an_unknown_delivery_is_never_retried() -> None:
    # It may have reached Braze, which has no idempotency key: a retry could message someone twice.
    for attempts in (1, 2, 4):
        assert retry_delay(POLICY, UNKNOWN, attempts, NOW, 0.0) is None


@pytest.mark.parametrize("status", [200, 201, 301, 400, 401, 403, 404, 413, 418, 500, 502, 503, 504])
def test_any_response_but_429_is_final(status: int) -> None:
    # Even with a Retry-After: a 503 may have been processed.
    reply = Reply(Delivery.RESPONDED, status, rate=RateLimit(retry_after=1.0))
    assert retry_delay(POLICY, reply, 1, NOW, 0.0) is None


def test_rate_limit_wait_prefers_retry_after_then_reset_then_the_fallback() -> None:
    assert rate_limit_wait(rate_limited(retry_after=2.5, reset=int(NOW) + 9), NOW, 7.0) == 2.5
    assert rate_limit_wait(rate_limited(retry_after=0.0, reset=int(NOW) + 9), NOW, 7.0) == 0.0
    assert rate_limit_wait(rate_limited(reset=int(NOW) + 9), NOW, 7.0) == 9.0
    assert rate_limit_wait(rate_limited(reset=int(NOW) + 9), NOW + 8.75, 7.0) == 0.25
    assert rate_limit_wait(rate_limited(), NOW, 7.0) == 7.0


def test_rate_limit_wait_is_never_negative() -> None:
    assert rate_limit_wait(rate_limited(retry_after=-1.0), NOW, 7.0) == 0.0
    assert rate_limit_wait(rate_limited(reset=int(NOW) - 1), NOW, 7.0) == 0.0


def test_a_429_that_names_its_reset_pauses_until_it_without_spending_an_attempt() -> None:
    reply = rate_limited(reset=int(NOW) + 4)
    assert rate_limit_pause(POLICY, reply, NOW, 0, 0.0) == 4.0
    assert rate_limit_pause(POLICY, reply, NOW, 0, 0.5) == 4.125
    assert rate_limit_pause(POLICY, rate_limited(retry_after=2.0), NOW, 3, 0.0) == 2.0
    assert rate_limit_pause(POLICY, rate_limited(reset=int(NOW) - 1), NOW, 0, 0.0) == 0.0  # the window turned
    assert rate_limit_pause(POLICY, reply, NOW, POLICY.max_rate_limited, 0.0) is None  # then attempts count
    assert rate_limit_pause(POLICY, rate_limited(reset=int(NOW) + 11), NOW, 0, 0.0) is None  # past max_wait


@pytest.mark.parametrize("reply", [rate_limited(), NOT_SENT, UNKNOWN, Reply(Delivery.RESPONDED, 503)])
def test_no_pause_for_a_429_that_does_not_say_when_nor_for_other_replies(reply: Reply) -> None:
    assert rate_limit_pause(POLICY, reply, NOW, 0, 0.0) is None
