"""When to call Braze again. Pure: the caller supplies the time and the jitter.

Only failures that cannot have sent anything are retried (CONTRACT.md section 6): a 429,
and a connection that could not be opened. 5xx and timeouts may have been processed by
Braze, which has no idempotency key, so they are returned as UNKNOWN instead.

A 429 that says when its budget returns (Retry-After, or x-ratelimit-reset) is not a failure to
give up on: the batch pauses until then (`rate_limit_pause`) and spends none of its attempts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .reply import Delivery, Reply


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """All but max_delay and max_rate_limited from `settings.Retry`, which holds their defaults."""

    max_attempts: int
    """Calls per batch, the first included."""
    base_delay: float
    """Backoff after the first connection failure; doubles, with jitter."""
    max_delay: float = 5.0
    """Cap on one backoff."""
    max_wait: float
    """Longest wait for a rate-limit reset; past it the batch is returned as rate limited."""
    min_time_left: float
    """Under a caller's deadline, a call starts only with at least this long left."""
    max_rate_limited: int = 10
    """429s that say when the budget returns a batch waits out, spending none of max_attempts;
    past them a 429 counts as an attempt again."""


def retry_delay(
    policy: RetryPolicy, reply: Reply, attempts: int, now: float, jitter: float, retry_502: bool = False
) -> float | None:
    """Seconds to wait before the next call, or None to stop. `jitter` is in [0, 1). With
    `retry_502` (the tenant's choice, off by default) a 502 is retried as a call that never left:
    Braze says a 502 failed before reaching its server (CONTRACT.md 8, point 32)."""
    if attempts >= policy.max_attempts:
        return None
    if reply.delivery is Delivery.NOT_SENT or (
        retry_502 and reply.delivery is Delivery.RESPONDED and reply.status == 502
    ):
        backoff: float = min(policy.max_delay, policy.base_delay * 2.0 ** (attempts - 1))
        return backoff * (0.5 + jitter / 2)
    if reply.delivery is Delivery.RESPONDED and reply.status == 429:
        wait = rate_limit_wait(reply, now, policy.base_delay * 2.0 ** (attempts - 1))
        wait += jitter * policy.base_delay
        return wait if wait <= policy.max_wait else None
    return None


def rate_limit_wait(reply: Reply, now: float, fallback: float) -> float:
    """Retry-After if given, else until x-ratelimit-reset, else `fallback`."""
    if reply.rate.retry_after is not None:
        return max(0.0, reply.rate.retry_after)
    if reply.rate.reset is not None:
        return max(0.0, reply.rate.reset - now)
    return fallback


def rate_limit_pause(
    policy: RetryPolicy, reply: Reply, now: float, paused: int, jitter: float
) -> float | None:
    """Seconds to pause before calling again after a 429 that says when the budget returns
    (Retry-After or x-ratelimit-reset), without spending an attempt; None for any other reply,
    past `max_wait`, or once the batch has `paused` max_rate_limited times. `jitter` is in [0, 1)."""
    if reply.delivery is not Delivery.RESPONDED or reply.status != 429 or paused >= policy.max_rate_limited:
        return None
    if reply.rate.retry_after is None and reply.rate.reset is None:
        return None
    wait = rate_limit_wait(reply, now, 0.0) + jitter * policy.base_delay
    return wait if wait <= policy.max_wait else None
