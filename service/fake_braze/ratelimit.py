"""Braze's rate limits as fixed-window counters per API key (CONTRACT.md section 5).

- Recipient-targeted requests share an hourly pool per key that resets on the
  clock hour.
- `broadcast: true` requests get 250 per minute per key and 10 per minute per
  unique audience (canvas_id plus the audience object); whichever runs out
  first answers. Braze does not describe how the minute windows reset, so they
  are aligned to the clock minute, like the hour.

Every authenticated request counts, including ones later answered 400. Other
consumers of the same key (`consumers`) spend on the hourly and per-key
broadcast windows too; each window tallies the fake's requests and theirs apart
(`Tally`), and the last `HISTORY` closed windows are kept to be shown. The
clock is injected so tests can move time; nothing here sleeps or does I/O.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from .consumers import OtherConsumer

HOUR = 3600
MINUTE = 60
HISTORY = 256  # closed windows kept per pool for `/_fake/budget` (hourly and per-key broadcast)


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


@dataclass(slots=True)
class Tally:
    """What was spent on one key in one window, and by whom."""

    requests: int = 0  # requests to the fake counted here and allowed by this window
    requests_refused: int = 0  # requests counted here once it was spent
    others: int = 0  # calls other consumers spent here (`consumers`)
    others_refused: int = 0  # calls other consumers wanted once it was spent
    scheduled: int = 0  # of the steady consumer's due calls, how many were already taken

    @property
    def spent(self) -> int:
        """Everything that counts against the limit: never more than it."""
        return self.requests + self.others


@dataclass(frozen=True, slots=True)
class WindowView:
    """One key's tally in one window, as `/_fake/budget` shows it."""

    key: Any
    start: int  # UTC epoch seconds
    end: int  # the window's `x-ratelimit-reset`
    limit: int
    tally: Tally  # a copy
    open: bool  # the current window; a closed one is final


class FixedWindow:
    """Counts hits per key in fixed windows of `period` seconds aligned to the epoch, with the
    spending of other consumers (`consumers.OtherConsumer`) on some keys, worked out lazily."""

    def __init__(self, limit: int, period: int, history: int = 0) -> None:
        self.limit = limit
        self.period = period
        self.consumers: dict[Any, OtherConsumer] = {}
        self._since: dict[Any, float] = {}  # when each consumer was set
        self._window = -1
        self._tallies: dict[Any, Tally] = {}
        self._closed: deque[tuple[int, dict[Any, Tally]]] = deque(maxlen=history)

    def hit(self, key: Any, now: float) -> Verdict:
        """Count one request for `key` at time `now` and report what is left."""
        tally = self._tally(key, now)
        allowed = tally.spent < self.limit
        if allowed:
            tally.requests += 1
        else:
            tally.requests_refused += 1
        return Verdict(
            allowed=allowed,
            limit=self.limit,
            remaining=max(self.limit - tally.spent, 0),
            reset=(self._window + 1) * self.period,
        )

    def spend(self, key: Any, calls: int, now: float) -> tuple[int, int]:
        """Other consumers spend `calls` on `key` now; returns how many were allowed and refused."""
        return _take(self._tally(key, now), calls, self.limit)

    def set_consumer(self, key: Any, consumer: OtherConsumer | None, now: float) -> None:
        """Start `consumer` on `key` now (None: stop the one there). An equal one carries on."""
        if self.consumers.get(key) == consumer:
            return
        tally = self._tally(key, now)  # the old consumer's spending up to now stands
        tally.scheduled = 0
        self._since[key] = now
        if consumer is None:
            self.consumers.pop(key, None)
        else:
            self.consumers[key] = consumer
            self._settle(key, tally, now)

    def views(self, now: float) -> list[WindowView]:
        """Closed windows kept (oldest first), then the current one, with consumers up to `now`."""
        for key in self.consumers:
            self._tally(key, now)
        windows = [(window, tallies, False) for window, tallies in self._closed]
        windows.append((self._window, self._tallies, True))
        return [
            WindowView(
                key,
                window * self.period,
                (window + 1) * self.period,
                self.limit,
                dataclasses.replace(tally),
                current,
            )
            for window, tallies, current in windows
            for key, tally in tallies.items()
        ]

    def reset(self) -> None:
        """Forget every count and closed window (consumers stay, and spend again)."""
        self._window = -1
        self._tallies = {}
        self._closed.clear()

    def _tally(self, key: Any, now: float) -> Tally:
        self._turn(now)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = Tally()
        self._settle(key, tally, now)
        return tally

    def _turn(self, now: float) -> None:
        window = int(now // self.period)
        if window == self._window:
            return
        if self._window >= 0 and self._closed.maxlen:
            end = (self._window + 1) * self.period
            for key in self.consumers:
                self._tallies.setdefault(key, Tally())
            for key, tally in self._tallies.items():
                self._settle(key, tally, end)  # what they spent until the window ended
            self._closed.append((self._window, self._tallies))
        # Dropping every key when the window moves keeps memory bounded by
        # the keys seen in one window (unique audiences can be many).
        self._window = window
        self._tallies = {}

    def _settle(self, key: Any, tally: Tally, now: float) -> None:
        """Bring `key`'s steady consumer up to `now` in the current window."""
        consumer = self.consumers.get(key)
        if consumer is None:
            return
        start = max(self._window * self.period, self._since[key])
        due = consumer.due(self.limit, max(now - start, 0.0))
        if due > tally.scheduled:
            _take(tally, due - tally.scheduled, self.limit)
            tally.scheduled = due


def _take(tally: Tally, calls: int, limit: int) -> tuple[int, int]:
    """Other consumers' `calls`: allowed while the window lasts, refused after."""
    allowed = max(min(calls, limit - tally.spent), 0)
    tally.others += allowed
    tally.others_refused += calls - allowed
    return allowed, calls - allowed


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
        audience_calls_on_broadcast_budget: bool = True,
        hourly_window_seconds: int = HOUR,
        consumers: Iterable[OtherConsumer] = (),
    ) -> None:
        self._clock = clock
        self._audience_calls = audience_calls_on_broadcast_budget
        self._hourly = FixedWindow(hourly_limit, hourly_window_seconds, HISTORY)
        self._broadcast = FixedWindow(broadcast_per_minute, MINUTE, HISTORY)
        self._audience = FixedWindow(broadcast_per_minute_per_audience, MINUTE)
        self._pools = {"hourly": self._hourly, "broadcast": self._broadcast}
        self.set_consumers(consumers)

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

    @property
    def consumers(self) -> tuple[OtherConsumer, ...]:
        """The other consumers spending now."""
        return tuple(consumer for pool in self._pools.values() for consumer in pool.consumers.values())

    def set_consumers(self, consumers: Iterable[OtherConsumer]) -> None:
        """Replace the other consumers; a new one starts now, an unchanged one carries on."""
        listed, now = tuple(consumers), self._clock()
        for name, pool in self._pools.items():
            wanted = {consumer.api_key: consumer for consumer in listed if consumer.pool == name}
            for key in list(pool.consumers):
                if key not in wanted:
                    pool.set_consumer(key, None, now)
            for key, consumer in wanted.items():
                pool.set_consumer(key, consumer, now)

    def spend(self, api_key: str, pool: str, calls: int) -> tuple[int, int]:
        """A burst: other consumers spend `calls` on `api_key`'s `pool` now; (allowed, refused)."""
        return self._pools[pool].spend(api_key, calls, self._clock())

    def budget(self) -> list[tuple[str, WindowView]]:
        """Every kept window of the hourly and per-key broadcast pools, by pool."""
        now = self._clock()
        return [(name, view) for name, pool in self._pools.items() for view in pool.views(now)]

    def reset(self) -> None:
        """Forget every count, as if a new window had started for every budget."""
        for window in (self._hourly, self._broadcast, self._audience):
            window.reset()
