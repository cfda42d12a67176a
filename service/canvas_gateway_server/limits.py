"""Per-tenant limits on calls to Braze, behind an interface so a shared (Redis) one can follow.

The in-process default bounds each tenant's concurrent batches and pauses a tenant whose
Braze budget is spent (x-ratelimit-remaining 0, or a 429) until x-ratelimit-reset (at most an
hour), as Braze advises. Recipient calls and broadcast calls have separate budgets in Braze, so they are
tracked apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from .tenants import Tenant
from .upstream import Delivery, Reply

MAX_PAUSE_SECONDS = 3600.0
"""The longest a tenant is paused on one reply: Braze's longest window is a clock hour."""


class UpstreamLimiter(Protocol):
    """What the dispatcher asks before and tells after each Braze call."""

    def slot(self, tenant: Tenant) -> AbstractAsyncContextManager[None]:
        """Held for the duration of one call: bounds a tenant's concurrent calls."""
        ...

    def paused_until(self, tenant: Tenant, broadcast: bool) -> float:
        """Epoch seconds before which the tenant should not call; 0 when not paused."""
        ...

    def observe(self, tenant: Tenant, broadcast: bool, reply: Reply) -> None:
        """Learn from a reply's status and rate-limit headers."""
        ...


class LocalLimiter:
    """In-process limiter: one semaphore per tenant and a pause per (tenant, budget)."""

    def __init__(self, default_concurrency: int, clock: Callable[[], float] = time.time) -> None:
        self._default = default_concurrency
        self._clock = clock
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._pauses: dict[tuple[str, bool], float] = {}

    def slot(self, tenant: Tenant) -> AbstractAsyncContextManager[None]:
        size = tenant.max_concurrent_batches or self._default
        # Keyed by size too: after a reload changes it, new calls use the new bound.
        semaphore = self._slots.setdefault((tenant.id, size), asyncio.Semaphore(size))
        return semaphore

    def paused_until(self, tenant: Tenant, broadcast: bool) -> float:
        until = self._pauses.get((tenant.id, broadcast), 0.0)
        return until if until > self._clock() else 0.0

    def observe(self, tenant: Tenant, broadcast: bool, reply: Reply) -> None:
        if reply.delivery is not Delivery.RESPONDED:
            return
        now = self._clock()
        spent = reply.status == 429 or reply.rate.remaining == 0
        if spent and reply.rate.reset is not None and reply.rate.reset > now:
            # Braze's windows are a clock hour at most: a later reset is a bad header, not a plan.
            key = (tenant.id, broadcast)
            until = min(float(reply.rate.reset), now + MAX_PAUSE_SECONDS)
            self._pauses[key] = max(until, self._pauses.get(key, 0.0))
        # A pause is never lifted early: within a window the budget only shrinks, so a reply
        # showing budget left was sent before the one that spent it. It ends at its reset.
