"""Braze's rate limits as fixed-window counters per API key (CONTRACT.md section 5).

- Recipient-targeted requests share an hourly pool per key that resets on the
  clock hour.
- `broadcast: true` requests get 250 per minute per key and 10 per minute per
  unique audience (canvas_id plus the audience object); whichever runs out
  first answers. Braze does not describe how the minute windows reset, so they
  are aligned to the clock minute, like the hour.

Every authenticated request counts, including ones later answered 400. The
clock is injected so tests can move time; nothing here sleeps or does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

HOUR = 3600
MINUTE = 60


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of counting one request, as the `x-ratelimit-*` headers report it."""

    allowed: bool
    limit: int
    remaining: int
    reset: int  # UTC epoch seconds at which the window ends

    def headers(self) -> dict[str, str]:
        """The lowercase rate-limit headers Braze sends, values as decimal strings."""
        return {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(self.remaining),
            "x-ratelimit-reset": str(self.reset),
        }


class FixedWindow:
    """Counts hits per key in fixed windows of `period` seconds aligned to the epoch."""

    def __init__(self, limit: int, period: int) -> None:
        self.limit = limit
        self.period = period
        self._window = -1
        self._counts: dict[Any, int] = {}

    def hit(self, key: Any, now: float) -> Verdict:
        """Count one request for `key` at time `now` and report what is left."""
        window = int(now // self.period)
        if window != self._window:
            # Dropping every key when the window moves keeps memory bounded by
            # the keys seen in one window (unique audiences can be many).
            self._window = window
            self._counts = {}
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        return Verdict(
            allowed=count <= self.limit,
            limit=self.limit,
            remaining=max(self.limit - count, 0),
            reset=(window + 1) * self.period,
        )

    def reset(self) -> None:
        """Forget every count."""
        self._window = -1
        self._counts = {}


def audience_key(canvas_id: Any, audience: Any) -> bytes:
    """Canonical identity of a broadcast audience: canvas_id plus the sorted-key audience JSON."""
    return orjson.dumps([canvas_id, audience], option=orjson.OPT_SORT_KEYS)


class RateLimiter:
    """The per-key budgets of one fake Braze workspace."""

    def __init__(
        self,
        clock: Callable[[], float],
        hourly_limit: int,
        broadcast_per_minute: int,
        broadcast_per_minute_per_audience: int,
        audience_calls_on_broadcast_budget: bool = False,
        hourly_window_seconds: int = HOUR,
    ) -> None:
        self._clock = clock
        self._audience_calls = audience_calls_on_broadcast_budget
        self._hourly = FixedWindow(hourly_limit, hourly_window_seconds)
        self._broadcast = FixedWindow(broadcast_per_minute, MINUTE)
        self._audience = FixedWindow(broadcast_per_minute_per_audience, MINUTE)

    def hit(self, api_key: str, body: Any) -> Verdict:
        """Count one authenticated request; `body` is the parsed JSON, or None."""
        now = self._clock()
        if isinstance(body, dict) and (
            body.get("broadcast") is True or (self._audience_calls and "audience" in body)
        ):
            audience = audience_key(body.get("canvas_id"), body.get("audience"))
            per_key = self._broadcast.hit(api_key, now)
            per_audience = self._audience.hit((api_key, audience), now)
            if not per_key.allowed:
                return per_key
            if not per_audience.allowed:
                return per_audience
            return min(per_key, per_audience, key=lambda verdict: verdict.remaining)
        return self._hourly.hit(api_key, now)

    def reset(self) -> None:
        """Forget every count, as if a new window had started for every budget."""
        for window in (self._hourly, self._broadcast, self._audience):
            window.reset()
