"""Per-tenant limits on calls to Braze, behind an interface; budgets in a store that may be shared.

The in-process default bounds each tenant's concurrent batches and pauses a tenant whose
Braze budget is spent (x-ratelimit-remaining 0, or a 429) until x-ratelimit-reset (at most an
hour), as Braze advises. Recipient calls and broadcast calls have separate budgets in Braze, so they are
tracked apart.

It also never starts more calls than the budget has left: it keeps the lowest
x-ratelimit-remaining of the current window (the same reset) and the calls under way, and a
call that would find the budget spent by those under way waits for one of them to answer
(docs/braze/CONTRACT.md, section 8, point 30). A window no reply has told of yet opens at the last
x-ratelimit-limit, and a budget never answered lets one call ask first, so that a fleet able to
start more calls at once than a window allows does not overspend it when a window opens. What
is known of each budget (`Budget`) lives in a `BudgetStore`: this process's, one shared by a
host's workers (`workers`), or Redis, shared by every replica (`shared`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar

from .tenants import Tenant
from .upstream import Delivery, Reply

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


class UpstreamLimiter(Protocol):
    """What the dispatcher asks before and tells after each Braze call."""

    def slot(self, tenant: Tenant) -> AbstractAsyncContextManager[None]:
        """Held for the duration of one call: bounds a tenant's concurrent calls."""
        ...

    async def reserve(self, tenant: Tenant, broadcast: bool) -> Ticket | Hold:
        """A Ticket when a call may start (it is then under way until `settle`), else a Hold.
        Raises StoreUnavailable when the budgets cannot be read and the deployment fails closed."""
        ...

    async def settle(self, ticket: Ticket, reply: Reply | None) -> float:
        """A reserved call has ended: learn from its reply (None: no call was made) and release
        it, in one step. Returns when the budget's pause ends (epoch seconds), 0 when not paused."""
        ...


class StoreUnavailable(Exception):
    """A shared store did not answer in time (the message names the store, never its URL)."""


@dataclass(slots=True)
class Budget:
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
    """the last x-ratelimit-limit Braze gave; 0: never answered; -1: its replies carry none"""

    def reserve(self, now: float) -> Hold | None:
        """None when a call may start (it is counted as under way), else when to ask again.
        The Lua script in `shared.py` is this method for Redis; they change together."""
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
        elif self.limit == 0:
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


T = TypeVar("T")


class BudgetStore(Protocol):
    """Where the `Budget`s live: this process, a host's workers (`workers`), or Redis (`shared`)."""

    async def reserve(self, key: tuple[str, bool], now: float) -> Ticket | Hold: ...

    async def settle(self, ticket: Ticket, reply: Reply | None, now: float) -> float: ...


class BudgetTable(Protocol):
    """Budgets kept in memory this process can lock: a dict, or a file the workers map."""

    def update(self, key: tuple[str, bool], change: Callable[[Budget], T]) -> T:
        """Apply `change` to the key's Budget as one step no other process interleaves with,
        keep the Budget it leaves, and return what `change` returned."""
        ...


class LocalTable:
    """This process's budgets."""

    def __init__(self) -> None:
        self._budgets: dict[tuple[str, bool], Budget] = {}

    def update(self, key: tuple[str, bool], change: Callable[[Budget], T]) -> T:
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = Budget()
        return change(budget)


class TableBudgets:
    """A `BudgetStore` over a `BudgetTable`: one locked update per reserve and per settle."""

    def __init__(self, table: BudgetTable | None = None) -> None:
        self._table = table or LocalTable()

    async def reserve(self, key: tuple[str, bool], now: float) -> Ticket | Hold:
        return self._table.update(key, lambda budget: budget.reserve(now)) or Ticket(key)

    async def settle(self, ticket: Ticket, reply: Reply | None, now: float) -> float:
        return self._table.update(ticket.key, lambda budget: budget.settle(reply, now))


class LocalLimiter:
    """A semaphore per tenant for its concurrent calls, and its Braze budgets in a `BudgetStore`.

    With `workers` above 1 (several processes spending the same budgets, through a shared
    store) each process allows its share of a tenant's concurrency, at least one."""

    def __init__(
        self,
        default_concurrency: int,
        clock: Callable[[], float] = time.time,
        budgets: BudgetStore | None = None,
        workers: int = 1,
    ) -> None:
        self._default = default_concurrency
        self._clock = clock
        self._budgets = budgets or TableBudgets()
        self._workers = workers
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}

    def slot(self, tenant: Tenant) -> AbstractAsyncContextManager[None]:
        size = max(1, (tenant.max_concurrent_batches or self._default) // self._workers)
        # Keyed by size too: after a reload changes it, new calls use the new bound.
        semaphore = self._slots.setdefault((tenant.id, size), asyncio.Semaphore(size))
        return semaphore

    async def reserve(self, tenant: Tenant, broadcast: bool) -> Ticket | Hold:
        return await self._budgets.reserve((tenant.id, broadcast), self._clock())

    async def settle(self, ticket: Ticket, reply: Reply | None) -> float:
        return await self._budgets.settle(ticket, reply, self._clock())
