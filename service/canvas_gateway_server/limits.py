"""Per-tenant limits on calls to Braze, behind an interface; budgets in a store that may be shared.

The in-process default bounds each tenant's concurrent batches and pauses a tenant whose
Braze budget is spent (x-ratelimit-remaining 0, or a 429) until x-ratelimit-reset (at most an
hour), as Braze advises. Recipient calls and broadcast calls have separate budgets in Braze, so they are
tracked apart.

It never starts more calls than a budget has left: what is known of each budget
(`rate_budget.RateBudget`) lives in a `BudgetStore` (this process's memory, a file a host's
workers map, or Redis for every replica: `stores/`), asked before each call and told after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from .rate_budget import BudgetStore, Hold, Ticket
from .reply import Reply
from .tenants import Tenant


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


class LocalLimiter:
    """A semaphore per tenant for its concurrent calls, and its Braze budgets in a `BudgetStore`.

    With `workers` above 1 (several processes spending the same budgets, through a shared
    store) each process allows its share of a tenant's concurrency, at least one."""

    def __init__(
        self,
        default_concurrency: int,
        budgets: BudgetStore,
        clock: Callable[[], float] = time.time,
        workers: int = 1,
    ) -> None:
        self._default = default_concurrency
        self._clock = clock
        self._budgets = budgets
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
