"""The shared budgets, failing open or closed while their store (Redis) does not answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from ..errors import StoreUnavailable
from ..metrics import Metrics
from ..rate_budget import NO_HEADROOM, BudgetKey, BudgetStore, Headroom, Hold, ReserveLost, Ticket
from ..reply import Reply

log = logging.getLogger(__name__)

RESETTLE_FIRST_SECONDS: Final = 0.1


RESETTLE_MAX_SECONDS: Final = 5.0
"""A settle Redis did not take is tried again after the first, doubling up to the most, and at
once when Redis answers a reserve."""


MAX_UNSETTLED: Final = 10_000
"""Settles kept for Redis at most; past them the oldest is left to its lease."""


class FailoverBudgets:
    """The shared budgets, and what to do while they do not answer: with a `fallback` (fail
    open) this process's own budgets, loudly; without one (fail closed) StoreUnavailable.

    A call whose settle did not reach Redis would stay counted as under way there until its lease
    ends (the longest call, 40 s by default), holding back every replica's calls. It is settled
    again, with its reply, as soon as Redis answers: by one task of this process on the shared
    client's pool, which tries the oldest first and backs off while Redis fails, so the load on a
    struggling Redis does not grow with the number of failures. A reserve whose answer never came
    (`ReserveLost`: Redis may have made it) is released the same way, with no reply."""

    def __init__(
        self,
        shared: BudgetStore,
        fallback: BudgetStore | None,
        metrics: Metrics | None = None,
        retry_seconds: tuple[float, float] = (RESETTLE_FIRST_SECONDS, RESETTLE_MAX_SECONDS),
        capacity: int = MAX_UNSETTLED,
    ) -> None:
        self._shared = shared
        self._fallback = fallback
        self._metrics = metrics or Metrics()
        self._failing = False
        self._retry_seconds = retry_seconds
        self._capacity = capacity
        self._unsettled: dict[str, tuple[Ticket, Reply | None, float]] = {}
        """Settles Redis did not take, by token, oldest first."""
        self._answered = asyncio.Event()
        self._resettling: asyncio.Task[None] | None = None

    @property
    def unsettled(self) -> int:
        """Calls ended here whose settle Redis has not taken yet."""
        return len(self._unsettled)

    def _failed(self, op: str, exc: StoreUnavailable) -> None:
        self._metrics.store_failure("budgets", op)
        if not self._failing:
            self._failing = True
            if self._fallback is not None:
                self._metrics.store_fallback("budgets", True)
                log.error("%s: budgets are this process's own until it answers (fail open)", exc)
            else:
                log.error("%s: batches end NOT_ATTEMPTED until it answers (fail closed)", exc)

    def _recovered(self) -> None:
        self._answered.set()  # settles left behind go now
        if self._failing:
            self._failing = False
            self._metrics.store_fallback("budgets", False)
            log.warning("the shared budgets store (Redis) answers again: budgets are shared again")

    async def reserve(self, key: BudgetKey, now: float, headroom: Headroom = NO_HEADROOM) -> Ticket | Hold:
        try:
            found = await self._shared.reserve(key, now, headroom)
        except StoreUnavailable as exc:
            self._failed("reserve", exc)
            if isinstance(exc, ReserveLost):  # released once Redis answers, not at its lease's end
                self._keep_unsettled(exc.ticket, None, now)
            if self._fallback is None:
                raise
            return await self._fallback.reserve(key, now, headroom)
        self._recovered()
        return found

    async def settle(self, ticket: Ticket, reply: Reply | None, now: float) -> float:
        if not ticket.shared:
            return await self._fallback.settle(ticket, reply, now) if self._fallback else 0.0
        try:
            return await self._shared.settle(ticket, reply, now)
        except StoreUnavailable as exc:
            self._failed("settle", exc)
            self._keep_unsettled(ticket, reply, now)
            return 0.0

    def _keep_unsettled(self, ticket: Ticket, reply: Reply | None, now: float) -> None:
        if len(self._unsettled) >= self._capacity:  # the oldest is left to its lease
            del self._unsettled[next(iter(self._unsettled))]
        self._unsettled[ticket.token] = (ticket, reply, now)
        if self._resettling is None or self._resettling.done():
            self._resettling = asyncio.get_running_loop().create_task(self._resettle())

    async def _resettle(self) -> None:
        first, most = self._retry_seconds
        delay = first
        while self._unsettled:
            self._answered.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered.wait(), delay)
            delay = first if await self._settle_unsettled() else min(most, delay * 2)

    async def _settle_unsettled(self) -> bool:
        """Settle what Redis did not take, oldest first; False at the first failure."""
        while self._unsettled:
            token, (ticket, reply, now) = next(iter(self._unsettled.items()))
            try:
                await self._shared.settle(ticket, reply, now)
            except StoreUnavailable as exc:
                self._failed("settle", exc)
                return False
            self._unsettled.pop(token, None)
        return True

    async def stop(self) -> None:
        """At shutdown: stop trying in the background, and settle once more what is left."""
        if self._resettling is not None:
            self._resettling.cancel()
            await asyncio.gather(self._resettling, return_exceptions=True)
        await self._settle_unsettled()
