"""A retry budget per tenant, behind an interface so a shared one can follow.

Retries are safe here (only calls that cannot have been sent are retried), but in an outage
every batch retrying multiplies the load on Braze and on the tenant's rate limit. The budget
lets a tenant's retries be at most `ratio` of its first attempts over the last `WINDOW`
seconds, plus `minimum` retries a window so that a quiet tenant can still retry. A retry the
budget refuses ends its batch with the result of the call before it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

WINDOW: Final = 10.0
"""Seconds over which calls and retries are counted."""


class RetryBudget(Protocol):
    """What the dispatcher tells of each first call and asks before each retry."""

    def called(self, tenant: str) -> None:
        """A batch's first call to Braze."""
        ...

    def try_retry(self, tenant: str) -> bool:
        """Whether the tenant may make one more retry now; spends it if so."""
        ...


class Unlimited:
    """Every retry allowed: the budget turned off."""

    def called(self, tenant: str) -> None:
        pass

    def try_retry(self, tenant: str) -> bool:
        return True


class LocalRetryBudget:
    """In-process budget: per tenant, the times of recent first calls and retries."""

    def __init__(self, ratio: float, minimum: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ratio = ratio
        self._minimum = minimum
        self._clock = clock
        self._calls: dict[str, deque[float]] = {}
        self._retries: dict[str, deque[float]] = {}

    def _recent(self, table: dict[str, deque[float]], tenant: str) -> deque[float]:
        times = table.setdefault(tenant, deque())
        horizon = self._clock() - WINDOW
        while times and times[0] <= horizon:
            times.popleft()
        return times

    def called(self, tenant: str) -> None:
        self._recent(self._calls, tenant).append(self._clock())

    def try_retry(self, tenant: str) -> bool:
        retries = self._recent(self._retries, tenant)
        allowed = self._minimum + self._ratio * len(self._recent(self._calls, tenant))
        if len(retries) + 1 > allowed:
            return False
        retries.append(self._clock())
        return True
