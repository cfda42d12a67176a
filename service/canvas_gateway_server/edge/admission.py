"""Which RPCs the gateway holds: how many streams callers may hold open (per tenant, and in
all), and the count of its own RPCs in progress that shutdown waits for (`InFlight`).

An idle stream costs little time but about 50 KB and a few tasks; thousands of them from one
tenant (2,952 measured: RSS 65 -> 323 MB) crowd out every other. Each SendStream takes a slot
once its caller is authenticated, before its header is read, and gives it back when it ends;
past either cap the stream is refused with RESOURCE_EXHAUSTED before anything is sent. The caps
are per process: a host's workers each allow as many.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from ..errors import TooManyStreams


class StreamSlots:
    """Counts the streams open, per tenant and in all, against their caps."""

    def __init__(self, total: int, per_tenant: int) -> None:
        self._total = total
        self._per_tenant = per_tenant
        self._open: Counter[str] = Counter()

    @property
    def open(self) -> int:
        return self._open.total()

    def hold(self) -> StreamHold:
        """A hold for one stream: `take` a slot once the tenant is known; ending the `with` frees it."""
        return StreamHold(self)

    def take(self, tenant: str) -> None:
        """Count one more stream of `tenant`; TooManyStreams when a cap is reached."""
        if self._open[tenant] >= self._per_tenant:
            raise TooManyStreams(
                f"this tenant already has {self._open[tenant]} streams open, the most one tenant may "
                "(CGW_MAX_STREAMS_PER_TENANT): end one first; nothing was sent"
            )
        if self.open >= self._total:
            raise TooManyStreams(
                f"this gateway already has {self.open} streams open, the most it takes (CGW_MAX_STREAMS): "
                "try again shortly; nothing was sent"
            )
        self._open[tenant] += 1

    def give_back(self, tenant: str) -> None:
        """One stream of `tenant` has ended."""
        self._open[tenant] -= 1
        if not self._open[tenant]:
            del self._open[tenant]


class StreamHold:
    """One stream's slot, taken at most once and given back when the stream ends."""

    def __init__(self, slots: StreamSlots) -> None:
        self._slots = slots
        self._tenant: str | None = None

    def take(self, tenant: str) -> None:
        """Count the stream against `tenant`; TooManyStreams when a cap is reached."""
        self._slots.take(tenant)
        self._tenant = tenant

    def __enter__(self) -> StreamHold:
        return self

    def __exit__(self, *_: object) -> None:
        if self._tenant is not None:
            self._slots.give_back(self._tenant)
            self._tenant = None


class InFlight:
    """Counts the gateway's own RPCs in progress, so shutdown knows when they are done."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self._count += 1
        self._idle.clear()

    def __exit__(self, *_: object) -> None:
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    @property
    def busy(self) -> bool:
        return self._count > 0

    async def idle(self) -> None:
        await self._idle.wait()
