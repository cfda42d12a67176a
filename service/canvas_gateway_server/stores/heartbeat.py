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
