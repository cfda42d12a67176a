"""The event-loop lag watcher: a task that samples how late a timer fires, into the metrics."""

from __future__ import annotations

import asyncio

from .process import LOOP_LAG_INTERVAL, ProcessMetrics


async def watch_loop_lag(metrics: ProcessMetrics, interval: float = LOOP_LAG_INTERVAL) -> None:
    """Until cancelled, sample the event loop's lag into `metrics` every `interval` seconds."""
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        await asyncio.sleep(interval)
        metrics.loop_lag(max(0.0, loop.time() - started - interval))
