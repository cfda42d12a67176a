"""A shared store's heartbeat: how Redis and the host's file know which processes still run."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..errors import StoreUnavailable


async def keep_beating(
    beat: Callable[[], Awaitable[object]], on_failure: Callable[[], None], every: float
) -> None:
    """A shared store's heartbeat, until cancelled: `beat` every `every` seconds; a beat the store
    did not take calls `on_failure` (the claims of a process silent too long are taken as dead)."""
    while True:
        try:
            await beat()
        except StoreUnavailable:
            on_failure()
        await asyncio.sleep(every)


class Heartbeat:
    """A store's heartbeat task: `start` runs `keep_beating` until `stop` (safe without `start`)."""

    def __init__(self, beat: Callable[[], Awaitable[object]], every: float) -> None:
        self._beat = beat
        self._every = every
        self._task: asyncio.Task[None] | None = None

    def start(self, on_failure: Callable[[], None]) -> None:
        self._task = asyncio.get_running_loop().create_task(keep_beating(self._beat, on_failure, self._every))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
