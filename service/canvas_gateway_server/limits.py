"""Per-tenant limits on calls to Braze, behind an interface so a shared (Redis) one can follow.

The in-process default bounds each tenant's concurrent batches and pauses a tenant whose
Braze budget is spent (x-ratelimit-remaining 0, or a 429) until x-ratelimit-reset (at most an
hour), as Braze advises. Recipient calls and broadcast calls have separate budgets in Braze, so they are
tracked apart.

It also never starts more calls than the budget has left: it keeps the lowest
x-ratelimit-remaining of the current window (the same reset) and the calls under way, and a
call that would find the budget spent by those under way waits for one of them to answer
(docs/braze/CONTRACT.md, section 8: the gateway's own rate-limit decisions).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from typing import Protocol

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

    def start_at(self, tenant: Tenant, broadcast: bool) -> float:
        """When a call may start: 0 now; else epoch seconds at which to ask again (the pause's
        end, or shortly, while the calls under way would spend what the budget has left)."""
        ...

    def calling(self, tenant: Tenant, broadcast: bool) -> AbstractContextManager[None]:
        """Held around one call to Braze: counts it against what the budget has left."""
        ...

    def observe(self, tenant: Tenant, broadcast: bool, reply: Reply) -> None:
        """Learn from a reply's status and rate-limit headers."""
        ...


class LocalLimiter:
    """In-process limiter: one semaphore per tenant and a pause per (tenant, budget)."""

    def __init__(
        self, default_concurrency: int, clock: Callable[[], float] = time.time, share: int = 1
    ) -> None:
        """`share`: how many processes spend the same budgets (workers); each keeps its calls under
        way to its part of what the last headers said is left."""
        self._default = default_concurrency
        self._clock = clock
        self._share = share
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._pauses: dict[tuple[str, bool], float] = {}
        self._left: dict[tuple[str, bool], tuple[int, int]] = {}
        """(reset, lowest x-ratelimit-remaining seen with that reset) per budget"""
        self._under_way: dict[tuple[str, bool], int] = {}

    def slot(self, tenant: Tenant) -> AbstractAsyncContextManager[None]:
        size = tenant.max_concurrent_batches or self._default
        # Keyed by size too: after a reload changes it, new calls use the new bound.
        semaphore = self._slots.setdefault((tenant.id, size), asyncio.Semaphore(size))
        return semaphore

    def paused_until(self, tenant: Tenant, broadcast: bool) -> float:
        until = self._pauses.get((tenant.id, broadcast), 0.0)
        return until if until > self._clock() else 0.0

    def start_at(self, tenant: Tenant, broadcast: bool) -> float:
        paused = self.paused_until(tenant, broadcast)
        if paused:
            return paused
        key = (tenant.id, broadcast)
        window = self._left.get(key)
        if window is None:
            return 0.0
        reset, left = window
        now = self._clock()
        if reset <= now:  # a new window: what is left is not known until a reply says
            del self._left[key]
            return 0.0
        if self._under_way.get(key, 0) * self._share >= left:
            return min(float(reset), now + RECHECK_SECONDS)
        return 0.0

    @contextmanager
    def calling(self, tenant: Tenant, broadcast: bool) -> Iterator[None]:
        key = (tenant.id, broadcast)
        self._under_way[key] = self._under_way.get(key, 0) + 1
        try:
            yield
        finally:
            self._under_way[key] -= 1

    def observe(self, tenant: Tenant, broadcast: bool, reply: Reply) -> None:
        if reply.delivery is not Delivery.RESPONDED:
            return
        rate = reply.rate
        if rate.remaining is not None and rate.reset is not None:
            key = (tenant.id, broadcast)
            reset, left = self._left.get(key, (0, 0))
            if rate.reset > reset:  # a later window: start counting it
                self._left[key] = (rate.reset, rate.remaining)
            elif rate.reset == reset and rate.remaining < left:  # within a window it only shrinks
                self._left[key] = (reset, rate.remaining)
        now = self._clock()
        spent = reply.status == 429 or reply.rate.remaining == 0
        if spent and reply.rate.reset is not None and reply.rate.reset > now:
            # Braze's windows are a clock hour at most: a later reset is a bad header, not a plan.
            key = (tenant.id, broadcast)
            until = min(float(reply.rate.reset), now + MAX_PAUSE_SECONDS)
            self._pauses[key] = max(until, self._pauses.get(key, 0.0))
        # A pause is never lifted early: within a window the budget only shrinks, so a reply
        # showing budget left was sent before the one that spent it. It ends at its reset.
