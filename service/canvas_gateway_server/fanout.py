"""One request's batches run concurrently (`FanOut`), their results handed back as they finish.

Each batch is sent by `dispatch.Dispatcher.send`. Results come back through a bounded queue: a
caller that stops reading stops the sending once gRPC's own buffers (flow-control windows, a few
MB of results) are full, and a stream's memory stays flat. Results a caller can no longer receive
are logged for reconciliation (`reporting`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable

from . import reporting
from .context import RequestContext
from .dispatch import Dispatcher
from .metrics import Metrics
from .model import Batch, BatchResult
from .outcomes import Recorder

_DONE = object()


class FanOut:
    """Runs one request's batches, at most `concurrency` at once; results come back as they finish."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        context: RequestContext,
        concurrency: int,
        queue_size: int,
        metrics: Metrics | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._context = context
        self._tenant_id = context.tenant.id
        self._metrics = metrics or Metrics()
        self._slots = asyncio.Semaphore(concurrency)
        self._queue: asyncio.Queue[BatchResult | object] = asyncio.Queue(queue_size)
        self._tasks: set[asyncio.Task[None]] = set()
        self._quiet_since = 0.0

    @property
    def recorder(self) -> Recorder:
        return self._dispatcher.recorder

    @property
    def quiet_since(self) -> float | None:
        """When the last batch in flight ended (time.monotonic; 0.0 if none ever was); None while
        one is in flight."""
        return None if self._tasks else self._quiet_since

    async def submit(self, batch: Batch) -> None:
        """Start a batch; waits while `concurrency` batches are in flight (backpressure)."""
        await self._slots.acquire()
        task = asyncio.create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: Batch) -> None:
        try:
            result = await self._dispatcher.send(self._context, batch)
            try:
                await self.put(result, batch)  # the slot is held until the caller can take it
            except asyncio.CancelledError:
                reporting.undelivered(self._metrics, self._context, result)
                raise
        finally:
            self._slots.release()
            self._quiet_since = time.monotonic()

    async def put(self, result: BatchResult, batch: Batch | None = None) -> None:
        """Hand back a result: a batch's, or one that needed no call (validation, validate_only);
        kept for GetResults first (with `batch`'s recipients hashed), delivered or not."""
        reporting.made(self._metrics, self._context, result)
        self._dispatcher.recorder.record(self._context, result, batch)
        await self._queue.put(result)
        self._metrics.buffered(self._tenant_id, 1)

    async def close(self) -> None:
        """No more batches: wait for those in flight, then end `results`."""
        while self._tasks:
            await asyncio.gather(*self._tasks)
        await self._queue.put(_DONE)

    async def results(self) -> AsyncIterator[BatchResult]:
        while True:
            item = await self._queue.get()
            if item is _DONE:
                return
            assert isinstance(item, BatchResult)
            self._metrics.buffered(self._tenant_id, -1)
            yield item

    def log_unread(self, handed: Iterable[BatchResult]) -> None:
        """Log results already handed to the caller's RPC that it may never have read."""
        reporting.unread(self._metrics, self._context, handed)

    def log_undelivered(self, result: BatchResult) -> None:
        """Log a result taken from `results` that never reached the caller's RPC."""
        reporting.undelivered(self._metrics, self._context, result)

    def cancel(self) -> None:
        """The caller is gone: stop the batches, and log the results it will never read."""
        for task in self._tasks:
            task.cancel()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, BatchResult):
                self._metrics.buffered(self._tenant_id, -1)
                reporting.undelivered(self._metrics, self._context, item)
