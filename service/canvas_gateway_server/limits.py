"""Per-tenant limits on calls to Braze, behind an interface; budgets in a store that may be shared.

The in-process default bounds each tenant's concurrent batches and pauses a pool whose Braze
budget is spent (x-ratelimit-remaining 0, or a 429) until x-ratelimit-reset (at most an hour), as
Braze advises. Budgets belong to Braze workspaces, not tenants (`Tenant.workspace_name`): two
tenants on one workspace spend one budget. A workspace has pools Braze keeps apart: recipient
calls, broadcast calls, and each unique audience's broadcast calls (10 a minute each); a
broadcast call reserves both its workspace's broadcast pool and its audience's.

It never starts more calls than a pool has left, less the workspace's headroom for its lane
(`rate_budget.Headroom`), and while a lane is contended a tenant has at most its fair share of it
under way (`rate_budget`'s docstring): what is known of each pool (`rate_budget.RateBudget`) lives in a
`BudgetStore` (this process's memory, a file a host's workers map, or Redis for every replica:
`stores/`), asked before each call and told after it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Final, Protocol

from .model import Batch
from .rate_budget import (
    AUDIENCE,
    BROADCAST,
    DEFAULT_POLICY,
    RECIPIENTS,
    TRANSACTIONAL,
    BudgetKey,
    BudgetStore,
    Hold,
    Ticket,
    WorkspacePolicy,
    audience_pool,
    party_of,
    pool_kind,
)
from .reply import RateLimit, Reply
from .tenants import Tenant

AUDIENCE_LIMIT: Final = 10
"""Braze's limit per unique audience (CONTRACT.md 8, point 18). A reply to a broadcast call whose
x-ratelimit-limit is at most this tells of the audience's pool, else of the workspace's."""


@dataclass(frozen=True, slots=True)
class Reserved:
    """A call's reservations: one per pool it draws on (a broadcast: the workspace's broadcast
    pool, then its audience's), held until `settle`."""

    tickets: tuple[Ticket, ...]
    policy: WorkspacePolicy = DEFAULT_POLICY
    """The workspace's, for metrics of what it keeps."""


class UpstreamLimiter(Protocol):
    """What the dispatcher asks before and tells after each Braze call."""

    def slot(self, tenant: Tenant) -> AbstractAsyncContextManager[None]:
        """Held for the duration of one call: bounds a tenant's concurrent calls."""
        ...

    async def reserve(self, tenant: Tenant, batch: Batch) -> Reserved | Hold:
        """Reservations when a call may start (it is then under way until `settle`), else a Hold.
        Raises StoreUnavailable when the budgets cannot be read and the deployment fails closed."""
        ...

    async def settle(self, reserved: Reserved, reply: Reply | None) -> float:
        """A reserved call has ended: learn from its reply (None: no call was made) and release
        it, in one step. Returns when the workspace's pool (`recipients` or `broadcast`) is paused
        until (epoch seconds), 0 when it is not: one audience's pause is that audience's alone."""
        ...


def lane_of(tenant: Tenant, batch: Batch) -> str:
    """The tenant's lane, if it fixes one; else the request's (unary Send transactional,
    SendStream bulk); a batch that names none is transactional."""
    return tenant.lane if tenant.lane != "auto" else batch.lane or TRANSACTIONAL


def pools_of(tenant: Tenant, batch: Batch) -> tuple[BudgetKey, ...]:
    """The pools a call draws on, each reserved in this order."""
    workspace = tenant.workspace_name
    if not batch.broadcast:
        return ((workspace, RECIPIENTS),)
    if not batch.audience:
        return ((workspace, BROADCAST),)
    return (workspace, BROADCAST), (workspace, audience_pool(batch.audience))


def answered_by(reserved: Reserved, reply: Reply | None) -> Ticket | None:
    """The reservation whose pool the reply's headers tell of; None when they tell of every
    pool the call drew on (one pool, or a reply without x-ratelimit-limit: the safe reading)."""
    limit = reply.rate.limit if reply is not None else None
    if len(reserved.tickets) == 1 or limit is None:
        return None
    want = AUDIENCE if limit <= AUDIENCE_LIMIT else BROADCAST
    return next(ticket for ticket in reserved.tickets if pool_kind(ticket.key[1]) == want)


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

    async def reserve(self, tenant: Tenant, batch: Batch) -> Reserved | Hold:
        lane = lane_of(tenant, batch)
        headroom = dataclasses.replace(tenant.policy.headroom(lane), party=party_of(tenant.id, lane))
        tickets: list[Ticket] = []
        for key in pools_of(tenant, batch):
            found = await self._budgets.reserve(key, self._clock(), headroom)
            if isinstance(found, Hold):
                for ticket in tickets:  # not a call: released, nothing learnt
                    await self._budgets.settle(ticket, None, self._clock())
                return found
            tickets.append(found)
        return Reserved(tuple(tickets), tenant.policy)

    async def settle(self, reserved: Reserved, reply: Reply | None) -> float:
        answered = answered_by(reserved, reply)
        paused = 0.0
        for ticket in reserved.tickets:
            told = reply
            if answered is not None and ticket is not answered and reply is not None:
                # The other pool's headers are not in this reply: it learns only that Braze answered.
                told = dataclasses.replace(reply, rate=RateLimit())
            until = await self._budgets.settle(ticket, told, self._clock())
            if pool_kind(ticket.key[1]) != AUDIENCE:
                paused = max(paused, until)
        return paused
