"""Per-tenant limits on calls to Braze, behind an interface so a shared (Redis) one can follow.

The in-process default bounds each tenant's concurrent batches and pauses a tenant whose
Braze budget is spent (x-ratelimit-remaining 0, or a 429) until x-ratelimit-reset (at most an
hour), as Braze advises. Recipient calls and broadcast calls have separate budgets in Braze, so they are
tracked apart.

It also never starts more calls than the budget has left: it keeps the lowest
x-ratelimit-remaining of the current window (the same reset) and the calls under way, and a
call that would find the budget spent by those under way waits for one of them to answer
(docs/braze/CONTRACT.md, section 8, point 30). What is known of each budget (`Budget`) lives
in a `BudgetStore`: this process's, or one shared by a host's workers (`workers`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .tenants import Tenant
from .upstream import Delivery, Reply

MAX_PAUSE_SECONDS = 3600.0
"""The longest a tenant is paused on one reply: Braze's longest window is a clock hour."""
RECHECK_SECONDS = 0.02
"""While the calls under way would spend what a budget has left, how soon a call asks again."""


class UpstreamLimiter(Protocol):
    """What the dispatcher asks before and tells after each Braze call."""

    def slot(self, tenant: Tenant) -> AbstractAsyncContextManager[None]:
        """Held for the duration of one call: bounds a tenant's concurrent calls."""
        ...

    def paused_until(self, tenant: Tenant, broadcast: bool) -> float:
        """Epoch seconds before which the tenant's budget is spent; 0 when not paused."""
        ...

    def reserve(self, tenant: Tenant, broadcast: bool) -> float:
        """0 when a call may start, and it is then counted as under way until `release`; else
        epoch seconds at which to ask again (the pause's end, or shortly, while the calls under
        way would spend what the budget has left)."""
        ...

    def release(self, tenant: Tenant, broadcast: bool) -> None:
        """A reserved call has ended (answered or not)."""
        ...

    def observe(self, tenant: Tenant, broadcast: bool, reply: Reply) -> None:
        """Learn from a reply's status and rate-limit headers."""
        ...


@dataclass(slots=True)
class Budget:
    """What is known of one (tenant, budget): a pause, the current window, the calls under way."""

    paused_until: float = 0.0
    reset: int = 0
    """x-ratelimit-reset of the current window; 0: unknown"""
    left: int = 0
    """the lowest x-ratelimit-remaining seen with that reset"""
    under_way: int = 0

    def reserve(self, now: float) -> float:
        if self.paused_until > now:
            return self.paused_until
        if self.reset and self.reset <= now:  # a new window: unknown until a reply says
            self.reset = self.left = 0
        if self.reset and self.under_way >= self.left:
            return min(float(self.reset), now + RECHECK_SECONDS)
        self.under_way += 1
        return 0.0

    def release(self) -> None:
        self.under_way = max(0, self.under_way - 1)

    def observe(self, reply: Reply, now: float) -> None:
        rate = reply.rate
        if rate.remaining is not None and rate.reset is not None:
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
    """Where the `Budget`s live: this process, or shared by the workers of a host."""

    def update(self, key: tuple[str, bool], change: Callable[[Budget], T]) -> T:
        """Apply `change` to the key's Budget as one step no other process interleaves with,
        keep the Budget it leaves, and return what `change` returned."""
        ...


class LocalBudgets:
    """The in-process store."""

    def __init__(self) -> None:
        self._budgets: dict[tuple[str, bool], Budget] = {}

    def update(self, key: tuple[str, bool], change: Callable[[Budget], T]) -> T:
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = Budget()
        return change(budget)


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
        self._budgets = budgets or LocalBudgets()
        self._workers = workers
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}

    def slot(self, tenant: Tenant) -> AbstractAsyncContextManager[None]:
        size = max(1, (tenant.max_concurrent_batches or self._default) // self._workers)
        # Keyed by size too: after a reload changes it, new calls use the new bound.
        semaphore = self._slots.setdefault((tenant.id, size), asyncio.Semaphore(size))
        return semaphore

    def paused_until(self, tenant: Tenant, broadcast: bool) -> float:
        now = self._clock()
        until = self._budgets.update((tenant.id, broadcast), lambda budget: budget.paused_until)
        return until if until > now else 0.0

    def reserve(self, tenant: Tenant, broadcast: bool) -> float:
        now = self._clock()
        return self._budgets.update((tenant.id, broadcast), lambda budget: budget.reserve(now))

    def release(self, tenant: Tenant, broadcast: bool) -> None:
        self._budgets.update((tenant.id, broadcast), Budget.release)

    def observe(self, tenant: Tenant, broadcast: bool, reply: Reply) -> None:
        if reply.delivery is not Delivery.RESPONDED:
            return
        now = self._clock()
        self._budgets.update((tenant.id, broadcast), lambda budget: budget.observe(reply, now))
