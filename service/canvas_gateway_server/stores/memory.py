"""The in-process stores: this process's claims and kept results, and its Braze budgets.

`LocalResults` is `idempotency.ResultStore` in memory (one process on port 0, and the tests);
`TableBudgets` is `rate_budget.BudgetStore` over a `BudgetTable`, by default `LocalTable`, a dict
(a host's workers give it their mapped file instead, `host_budgets`).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from ..context import IdempotencyScope
from ..idempotency import Claim, Verdict
from ..outcomes import Row
from ..rate_budget import NO_HEADROOM, BudgetKey, BudgetTable, Headroom, Hold, RateBudget, Ticket
from ..reply import Reply


@dataclass(slots=True)
class _Kept:
    digest: str
    expires: float
    kept: bytes
    """b"" for a claim found LOST (kept as UNKNOWN)."""


@dataclass(slots=True)
class _Claimed:
    digest: str
    claimed_at: float
    token: str
    sending: bool = False
    """The claim's call may have left (mark_sending)."""


@dataclass(slots=True)
class _Record:
    """One request's kept outcomes (`outcomes.OutcomeStore`): entry (a batch index) -> its bytes."""

    expires: float
    entries: dict[str, bytes]


SWEEP_SECONDS: Final = 1.0
"""How often `LocalResults` frees what has expired, whether or not its key is used again."""


class LocalResults:
    """This process's claims and results: each kept `ttl` seconds, at most `capacity` in all.

    What an entry holds is sized (BENCHMARKS.md, `bench/memory.py`: about 0.6 KB with a SENT
    result; orjson's output is copied to its length, since its buffer is 4 KB). Expired entries
    are freed every SWEEP_SECONDS by `start`'s task (and a lookup never answers with one).
    Past the capacity the oldest kept result goes first (every entry lives `ttl` from its keep,
    so the oldest is also the one nearest its end), counted in
    canvas_gateway_idempotency_total{verdict="evicted"}, and a key's guarantee lasts as long as
    its entries are kept; but:

    - claims in flight are never evicted (they are bounded by the concurrency; the store may
      hold more than `capacity` while they are);
    - a result is evicted from the tenant that holds the most entries, so a tenant holding no
      more than its share (capacity / the tenants holding entries) loses none to another's
      traffic.

    Every claim is this process's, so a claim is BUSY until it ends or its lease runs out
    (then claimed again if its call never left, else LOST)."""

    def __init__(
        self,
        ttl: float,
        capacity: int,
        lease: float,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[str], None] = lambda tenant: None,
        on_evict_outcome: Callable[[str], None] = lambda tenant: None,
    ) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._lease = lease
        self._clock = clock
        self._on_evict = on_evict
        self._kept: dict[str, OrderedDict[tuple[IdempotencyScope, int], _Kept]] = {}
        """Per tenant, in the order kept: oldest (and first to expire) first."""
        self._claims: dict[tuple[IdempotencyScope, int], _Claimed] = {}
        self._held: dict[str, int] = {}
        """Entries (kept and claimed) per tenant."""
        self._sweeper: asyncio.Task[None] | None = None
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()
        """Kept outcomes per (tenant, handle), least recently written first."""
        self._outcomes = 0
        """Entries (batches) in `_records`: at most `capacity`, the oldest records going first."""
        self._on_evict_outcome = on_evict_outcome

    @property
    def outcomes(self) -> int:
        """Kept outcomes (batch entries, one per handle)."""
        return self._outcomes

    async def record(self, rows: Sequence[Row]) -> None:
        expires = self._clock() + self._ttl
        for tenant, handle, entry, data in rows:
            record = self._records.pop((tenant, handle), None)
            if record is None:
                record = _Record(expires, {})
            self._records[(tenant, handle)] = record
            record.expires = expires
            if entry not in record.entries:
                self._outcomes += 1
            record.entries[entry] = bytes(memoryview(data))  # copied to its length (orjson's buffer)
        while self._outcomes > self._capacity and len(self._records) > 1:
            (gone, _), first = self._records.popitem(last=False)
            self._outcomes -= len(first.entries)
            self._on_evict_outcome(gone)

    async def read(self, tenant: str, handle: str) -> list[bytes]:
        record = self._records.get((tenant, handle))
        if record is None or record.expires <= self._clock():
            return []
        return list(record.entries.values())

    def __len__(self) -> int:
        return sum(self._held.values())

    def held(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    async def claim(self, scope: IdempotencyScope, index: int, digest: str, token: str) -> Claim:
        now = self._clock()
        key, tenant = (scope, index), scope.tenant
        entries = self._kept.get(tenant)
        kept = entries.get(key) if entries is not None else None
        if kept is not None and kept.expires > now:
            if kept.digest != digest:
                return Claim(Verdict.MISMATCH, kept.kept)
            return Claim(Verdict.KEPT, kept.kept)
        claimed = self._claims.get(key)
        if claimed is not None and claimed.claimed_at + self._ttl > now:
            if claimed.digest != digest:
                return Claim(Verdict.MISMATCH)
            if now - claimed.claimed_at < self._lease:
                return Claim(Verdict.BUSY)
            if not claimed.sending:  # its call never started: nothing can have reached Braze
                self._claims[key] = _Claimed(digest, now, token)
                return Claim(Verdict.RECLAIMED)
            self._put(tenant, key, _Kept(digest, now + self._ttl, b""))
            return Claim(Verdict.LOST)
        self._drop(tenant, key)  # an expired entry, if any
        self._claims[key] = _Claimed(digest, now, token)
        self._held[tenant] = self._held.get(tenant, 0) + 1
        self._evict()
        return Claim(Verdict.CLAIMED)

    async def mark_sending(self, scope: IdempotencyScope, index: int, token: str) -> bool:
        claimed = self._claims.get((scope, index))
        if claimed is None or claimed.token != token:
            return False
        claimed.sending = True
        return True

    async def keep(
        self, scope: IdempotencyScope, index: int, digest: str, token: str, kept: bytes | None
    ) -> None:
        key, tenant = (scope, index), scope.tenant
        claimed = self._claims.get(key)
        if kept is None:
            if claimed is not None and claimed.token == token:
                self._drop(tenant, key)
            return
        if claimed is not None and claimed.token != token:
            return  # another call's claim holds the batch now
        # Copied to its length: orjson's bytes keep their whole (4 KB) buffer.
        self._put(tenant, key, _Kept(digest, self._clock() + self._ttl, bytes(memoryview(kept))))
        self._evict()

    def _put(self, tenant: str, key: tuple[IdempotencyScope, int], kept: _Kept) -> None:
        self._drop(tenant, key)
        self._kept.setdefault(tenant, OrderedDict())[key] = kept
        self._held[tenant] = self._held.get(tenant, 0) + 1

    def _drop(self, tenant: str, key: tuple[IdempotencyScope, int]) -> None:
        gone = self._claims.pop(key, None) is not None
        kept = self._kept.get(tenant)
        if kept is not None and kept.pop(key, None) is not None:
            gone = True
            if not kept:
                del self._kept[tenant]
        if gone:
            self._forget(tenant, 1)

    def _forget(self, tenant: str, count: int) -> None:
        self._held[tenant] -= count
        if not self._held[tenant]:
            del self._held[tenant]

    def _evict(self) -> None:
        excess = len(self) - self._capacity
        while excess > 0 and self._kept:
            tenant = max(self._kept, key=self._held.__getitem__)
            entries = self._kept[tenant]
            entries.popitem(last=False)
            if not entries:
                del self._kept[tenant]
            self._forget(tenant, 1)
            self._on_evict(tenant)
            excess -= 1

    def expire(self) -> int:
        """Free every entry past its time (kept results past the TTL, claims past the TTL); how
        many. Kept results expire in the order kept, so this reads only what it frees."""
        now = self._clock()
        freed = 0
        for tenant in list(self._kept):
            entries = self._kept[tenant]
            count = 0
            while entries and next(iter(entries.values())).expires <= now:
                entries.popitem(last=False)
                count += 1
            if not entries:
                del self._kept[tenant]
            if count:
                self._forget(tenant, count)
                freed += count
        while self._records and next(iter(self._records.values())).expires <= now:
            _, record = self._records.popitem(last=False)
            self._outcomes -= len(record.entries)
        for key in [key for key, claimed in self._claims.items() if claimed.claimed_at + self._ttl <= now]:
            del self._claims[key]
            self._forget(key[0].tenant, 1)
            freed += 1
        return freed

    def start(self, on_failure: Callable[[], None] = lambda: None) -> None:
        """Free expired entries every SWEEP_SECONDS until `stop` (memory has no heartbeat to fail)."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self.expire()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)


T = TypeVar("T")


MAX_BUDGETS: Final = 10_000
"""Pools `LocalTable` keeps at most: audience pools can be many (one per Canvas and audience)."""


class LocalTable:
    """This process's budgets, at most `capacity`: past it the least recently used goes (it is
    known again from its next reply, as at start-up; a pool with calls under way is recent)."""

    def __init__(self, capacity: int = MAX_BUDGETS) -> None:
        self._budgets: OrderedDict[BudgetKey, RateBudget] = OrderedDict()
        self._capacity = capacity

    def __len__(self) -> int:
        return len(self._budgets)

    def update(self, key: BudgetKey, change: Callable[[RateBudget], T]) -> T:
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = RateBudget()
            if len(self._budgets) > self._capacity:
                self._budgets.popitem(last=False)
        else:
            self._budgets.move_to_end(key)
        return change(budget)


class TableBudgets:
    """A `BudgetStore` over a `BudgetTable`: one locked update per reserve and per settle."""

    def __init__(self, table: BudgetTable | None = None) -> None:
        self._table = table or LocalTable()

    async def reserve(self, key: BudgetKey, now: float, headroom: Headroom = NO_HEADROOM) -> Ticket | Hold:
        def reserve(budget: RateBudget) -> Ticket | Hold:
            return budget.reserve(now, headroom) or Ticket(key, ours=budget.ours, party=headroom.party)

        return self._table.update(key, reserve)

    async def settle(self, ticket: Ticket, reply: Reply | None, now: float) -> float:
        return self._table.update(ticket.key, lambda budget: budget.settle(reply, now, ticket.party))
