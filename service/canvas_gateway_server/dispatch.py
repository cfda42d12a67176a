"""Sends batches: per-tenant limits and safe retries, one batch at a time.

`Dispatcher.send` turns one batch into exactly one BatchResult, whatever happens short of
cancellation. `fanout.FanOut` runs one request's batches through it concurrently, with bounded
fan-out and backpressure.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import keeping, reporting, results, tracing
from .breaker import CircuitBreaker, NoBreaker, host_of
from .context import RequestContext
from .errors import StoreUnavailable
from .idempotency import Claimed, Ledger
from .limits import UpstreamLimiter, answered_by
from .metrics import Metrics
from .model import Batch, BatchResult, Code
from .outcomes import Recorder
from .rate_budget import Hold
from .reply import Delivery
from .retry import RetryPolicy, rate_limit_pause, retry_delay
from .retry_budget import RetryBudget, Unlimited
from .upstream import BrazeClient

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Progress:
    """How far a batch got: what an abandoned batch's result must admit to."""

    attempts: int = 0
    sent: bool = False
    """The current call's request has started going out (set by upstream's trace hook)."""
    marked: bool = False
    """Under a key: the claim records that the batch's call may leave (`Ledger.sending`)."""


class _Mark:
    """The `leaving` of a call under a key: the claim records that the batch's call may leave
    (`Ledger.sending`), asked by `upstream` once the call's connection is in hand, so that nothing
    but the bytes leaving follows it. A gateway that dies before this point (waiting for a slot, for
    budget, for a pooled connection, or connecting) leaves a batch that is sent by the next call
    with the key, not one UNKNOWN for good."""

    __slots__ = ("_claimed", "_ledger", "_progress", "unsent")

    def __init__(self, ledger: Ledger, claimed: Claimed, progress: _Progress) -> None:
        self._ledger = ledger
        self._claimed = claimed
        self._progress = progress
        self.unsent: BatchResult | None = None
        """The result that ends the batch unsent, when the claim refused the call."""

    async def leaving(self) -> bool:
        self.unsent = await self._ledger.sending(self._claimed)
        self._progress.marked = self.unsent is None
        return self._progress.marked


class Dispatcher:
    """One batch in, one result out: rate limits, calls, and retries of what is safe.

    `abandon()` is called when a shutdown's grace period is over: every batch still waiting or
    calling then ends at once with a result that says whether its call may have reached Braze.
    """

    def __init__(
        self,
        client: BrazeClient,
        limiter: UpstreamLimiter,
        policy: RetryPolicy,
        ledger: Ledger,
        metrics: Metrics | None = None,
        *,
        breaker: CircuitBreaker | None = None,
        budget: RetryBudget | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        tracer: Tracer | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self._client = client
        self.recorder = recorder or Recorder(None)
        """Where every result of a request is kept for GetResults (`outcomes`)."""
        self._limiter = limiter
        self._policy = policy
        self._metrics = metrics or Metrics()
        self._breaker = breaker or NoBreaker()
        self._budget = budget or Unlimited()
        self._ledger = ledger
        self._clock = clock
        self._sleep = sleep if tracer is None else tracing.timed_sleep(sleep)  # waits on the batch span
        self._tracer = tracer
        self._jitter = jitter
        self._abandoned = False
        self._running: set[asyncio.Task[object]] = set()

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    def abandon(self) -> None:
        """End every batch in progress now, and every later one before it starts."""
        self._abandoned = True
        for task in list(self._running):
            task.cancel()

    async def send(self, context: RequestContext, batch: Batch) -> BatchResult:
        """The batch's result (`_send`), in a span of its own when tracing is on."""
        if self._tracer is None:
            return await self._send(context, batch)
        return await tracing.traced_batch(self._tracer, context, batch, self._send)

    async def _send(self, context: RequestContext, batch: Batch) -> BatchResult:
        """The batch's result. The context's `deadline` (time.monotonic) is the caller's, less a
        margin: no call starts with less than the policy's `min_time_left` before it, and none
        outlasts it. Under an idempotency `scope` the batch is claimed first, and its result kept
        (`idempotency`)."""
        tenant = context.tenant
        progress = _Progress()
        task = asyncio.current_task()
        if self._abandoned or task is None:
            return results.abandoned(batch, progress.attempts, progress.sent)
        claimed = None
        if context.scope is not None:
            found = await self._ledger.claim(context.scope, batch)
            if isinstance(found, BatchResult):
                return found
            claimed = found
        self._running.add(task)
        self._metrics.batch_started(tenant.id)
        try:
            if self.abandoned:  # while the claim was made
                result = results.abandoned(batch, progress.attempts, progress.sent)
            else:
                result = await self._attempt(context, batch, progress, claimed)
        except asyncio.CancelledError:
            if not self._consume_abandon_cancel(task):
                if claimed is not None:
                    self._ledger.keep_soon(claimed, progress.sent)
                if progress.sent:
                    reporting.cancelled_while_calling(context, batch)
                self._record_soon(context, batch, progress.sent)
                raise
            result = results.abandoned(batch, progress.attempts, progress.sent)
        finally:
            self._running.discard(task)
            self._metrics.batch_finished(tenant.id)
        if claimed is not None:  # kept even if the caller goes while it is being kept
            await asyncio.shield(self._ledger.keep(claimed, result))
        return result

    def _record_soon(self, context: RequestContext, batch: Batch, sent: bool) -> None:
        """The call was cancelled with its caller: keep for GetResults what its result would have
        been (UNKNOWN if the batch may have gone out, else NOT_ATTEMPTED)."""
        if sent:
            result = keeping.lost(batch, keeping.CUT_OFF_TEXT)
        else:
            result = results.not_attempted(batch, "cancelled: its caller went away", Code.ABORTED)
        self.recorder.record(context, result, batch)

    def _consume_abandon_cancel(self, task: asyncio.Task[object]) -> bool:
        """True when a cancellation is abandon()'s alone: it becomes a result. Any other
        cancellation (the caller went away) goes on."""
        return self._abandoned and task.uncancel() == 0

    async def _attempt(
        self, context: RequestContext, batch: Batch, progress: _Progress, claimed: Claimed | None
    ) -> BatchResult:
        metrics, broadcast, policy = self._metrics, batch.broadcast, self._policy
        tenant, deadline = context.tenant, context.deadline

        def left() -> float:
            return math.inf if deadline is None else deadline - time.monotonic()

        waited = 0  # 429s that said when the budget returns, waited out without spending attempts
        try:
            while True:
                async with self._limiter.slot(tenant):
                    while isinstance(hold := await self._limiter.reserve(tenant, batch), Hold):
                        wait = hold.until - self._clock()
                        # A spent budget waits at most max_wait for its reset; a call held while
                        # others are under way waits for them, within the deadline only.
                        allowed = left() - policy.min_time_left
                        if wait > (min(policy.max_wait, allowed) if hold.spent else allowed):
                            return results.rate_limited_locally(batch, progress.attempts, int(hold.until))
                        await self._sleep(max(0.0, wait))
                        metrics.rate_limit_wait(tenant.id, max(0.0, wait))
                    reply = None
                    try:  # reserved: counted against what the budget has left until settled
                        time_left = left()
                        if time_left < policy.min_time_left:
                            return results.deadline_cut(batch, progress.attempts)
                        url = tenant.braze_rest_url
                        blocked = self._breaker.blocked_until(url)
                        if blocked:
                            return results.circuit_open(batch, progress.attempts, host_of(url), blocked)
                        if progress.attempts == 0:
                            self._budget.called(tenant.id)
                        progress.attempts += 1
                        started = time.perf_counter()
                        mark = None
                        if claimed is not None and not progress.marked:
                            mark = _Mark(self._ledger, claimed, progress)
                        leaving = None if mark is None else mark.leaving
                        reply = await self._client.trigger(tenant, batch.body, progress, time_left, leaving)
                        if mark is not None and mark.unsent is not None:  # refused: nothing left
                            reply = None
                            return mark.unsent
                    finally:
                        paused = await self._limiter.settle(hold, reply)
                    metrics.braze_call(tenant.id, broadcast, reply, time.perf_counter() - started)
                    self._breaker.record(url, reply)
                    progress.sent = False  # the reply settled that call
                    metrics.paused(tenant.id, broadcast, paused)
                    metrics.budget(hold, answered_by(hold, reply), reply)
                now, jitter = self._clock(), self._jitter()
                pause = rate_limit_pause(policy, reply, now, waited, jitter)
                if pause is not None and pause <= left() - policy.min_time_left:
                    waited += 1  # its budget returns in time: wait for it, as for a spent budget
                    metrics.retry(tenant.id, "rate_limited")
                    await self._sleep(pause)
                    metrics.rate_limit_wait(tenant.id, pause)
                    continue
                delay = retry_delay(policy, reply, progress.attempts - waited, now, jitter, tenant.retry_502)
                if delay is None or delay > left() - policy.min_time_left:
                    return results.from_reply(batch, reply, progress.attempts)
                if not self._budget.try_retry(tenant.id):
                    metrics.retry_denied(tenant.id)
                    return results.from_reply(batch, reply, progress.attempts)
                rate_limited = reply.delivery is Delivery.RESPONDED and reply.status == 429
                reason = "rate_limited" if rate_limited else "connect_failed"
                metrics.retry(tenant.id, "bad_gateway" if reply.status == 502 else reason)
                await self._sleep(delay)
                if rate_limited:
                    metrics.rate_limit_wait(tenant.id, delay)
        except StoreUnavailable as exc:
            return results.store_unavailable(batch, progress.attempts, str(exc))
        except Exception:
            log.exception("batch %d of tenant %s failed inside the gateway", batch.index, tenant.id)
            return results.failed_inside_gateway(batch, progress.attempts)
