"""Braze's rate budget for one (tenant, budget), and the ports of the stores that keep it.

A `RateBudget` is what is known of one of a tenant's Braze budgets (recipient calls or broadcast
calls: Braze keeps them apart): a pause until its reset, the current window, the calls under way.
It never lets more calls start than the window has left (docs/braze/CONTRACT.md, section 8,
point 30). A window no reply has told of yet opens at the last x-ratelimit-limit, and a budget
never answered lets one call ask first, so that a fleet able to start more calls at once than a
window allows does not overspend it when a window opens.

Where the budgets live is a `BudgetStore`: this process's memory, a file a host's workers map,
or Redis for every replica (`stores/`). `limits.LocalLimiter` asks it before each call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar

from .errors import StoreUnavailable
from .reply import Delivery, Reply

T = TypeVar("T")

MAX_PAUSE_SECONDS = 3600.0
"""The longest a tenant is paused on one reply: Braze's longest window is a clock hour."""


RECHECK_SECONDS = 0.02
"""While the calls under way would spend what a budget has left, how soon a call asks again."""


class Hold(NamedTuple):
    """A call may not start yet: ask again at `until` (epoch seconds)."""

    until: float
    spent: bool
    """The budget is spent until `until`, its reset; else the calls under way would spend
    what it has left, and `until` is when to ask again."""


@dataclass(frozen=True, slots=True)
class Ticket:
    """A reserved call: counted as under way until it is settled."""

    key: tuple[str, bool]
    """(tenant id, broadcast budget)"""
    token: str = ""
    """A shared store's name for the reservation (it lapses by itself if never settled)."""
    shared: bool = False
    """Reserved in the shared store, not in the fallback of a `FailoverBudgets`."""


@dataclass(slots=True)
class RateBudget:
    """What is known of one (tenant, budget): a pause, the current window, the calls under way.

    A window Braze has not yet answered in opens at the last limit Braze gave (x-ratelimit-limit),
    with the calls under way counted against it: a fleet that can start more calls at once than a
    window allows starts no more than the limit when the window turns. A budget never answered
    lets one call ask first, so that even the first window is not overspent."""

    paused_until: float = 0.0
    reset: int = 0
    """x-ratelimit-reset of the current window; 0: unknown"""
    left: int = 0
    """the lowest x-ratelimit-remaining seen with that reset; while the reset is unknown, the
    last known limit (0: none)"""
    under_way: int = 0
    limit: int = 0
    """the last x-ratelimit-limit Braze gave; 0: never answered with one; -1: a success carried none"""

    def reserve(self, now: float) -> Hold | None:
        """None when a call may start (it is counted as under way), else when to ask again.
        The Lua script in `stores/redis_scripts.py` is this method for Redis; they change together."""
        if self.paused_until > now:
            return Hold(self.paused_until, True)
        if self.reset and self.reset <= now:  # a new window: it opens at the last known limit
            self.reset, self.left = 0, max(self.limit, 0)
        # Known when a reply told of this window, or the window opened at the last limit. A budget
        # never answered lets one call ask first; one whose replies carry no limit is not bounded.
        room = self.left if self.reset or self.left else 1 if self.limit == 0 else None
        if room is not None and self.under_way >= room:
            return Hold(min(float(self.reset or math.inf), now + RECHECK_SECONDS), False)
        self.under_way += 1
        return None

    def settle(self, reply: Reply | None, now: float) -> float:
        """Release a call, learning from its reply; the pause's end, or 0."""
        self.under_way = max(0, self.under_way - 1)
        if reply is not None and reply.delivery is Delivery.RESPONDED:
            self.observe(reply, now)
        return self.paused_until if self.paused_until > now else 0.0

    def observe(self, reply: Reply, now: float) -> None:
        rate = reply.rate
        if rate.limit is not None and rate.limit > 0:
            self.limit = rate.limit
        elif self.limit == 0 and 200 <= reply.status < 300:
            # Only Braze's own answer tells that its replies carry no limit: a 5xx from an edge
            # (or a fault) has no headers and says nothing of the budget, so one call still asks.
            self.limit = -1
        if rate.remaining is not None and rate.reset is not None and rate.reset > now:
            if rate.reset > self.reset:  # a later window: start counting it
                self.reset, self.left = rate.reset, rate.remaining
            elif rate.reset == self.reset:  # within a window it only shrinks
                self.left = min(self.left, rate.remaining)
        spent = reply.status == 429 or rate.remaining == 0
        if spent and rate.reset is not None and rate.reset > now:
            # Braze's windows are a clock hour at most: a later reset is a bad header, not a plan.
            # A pause is never lifted early: within a window the budget only shrinks, so a reply
            # showing budget left was sent before the one that spent it. It ends at its reset.
            self.paused_until = max(self.paused_until, min(float(rate.reset), now + MAX_PAUSE_SECONDS))


class BudgetStore(Protocol):
    """Where the `RateBudget`s live: this process, a host's workers, or Redis (`stores/`)."""

    async def reserve(self, key: tuple[str, bool], now: float) -> Ticket | Hold: ...

    async def settle(self, ticket: Ticket, reply: Reply | None, now: float) -> float: ...


class BudgetTable(Protocol):
    """Budgets kept in memory this process can lock: a dict, or a file the workers map."""

    def update(self, key: tuple[str, bool], change: Callable[[RateBudget], T]) -> T:
        """Apply `change` to the key's RateBudget as one step no other process interleaves with,
        keep the RateBudget it leaves, and return what `change` returned."""
        ...


class ReserveLost(StoreUnavailable):
    """A reserve whose answer never came: Redis may have made it (the script ran, or runs later),
    and then counts `ticket` as under way until its lease ends unless it is settled."""

    def __init__(self, message: str, ticket: Ticket) -> None:
        super().__init__(message)
        self.ticket = ticket
