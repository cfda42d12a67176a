"""The send use cases, free of gRPC: a unary Send (`UnarySend`), and a SendStream session.

Both run the same loop over one `Intake` (check, encode, batch each recipient once; or only
batch those checked and encoded already by the compiled path, `take_encoded`/`feed_encoded`)
with a policy for what to do with a batch and with a rejected recipient:
- unary Send is all-or-nothing: it collects every violation of the request (top level and
  recipients, all at once) and sends nothing unless there are none;
- a stream checks its header first, then sends each batch as it closes and answers each
  rejected recipient with a result of its own.
Then FanOut (limits, retries, REST) turns batches into results.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from . import reporting, results
from .context import RequestContext
from .dispatch import Dispatcher
from .errors import InvalidRequest
from .fanout import FanOut
from .metrics import Metrics
from .model import Batch, BatchResult, Code, Summary, Violation
from .outcomes import Recorder
from .planning import Intake, Taken, authorize
from .rate_budget import BULK, TRANSACTIONAL
from .replaying import Replayer
from .validate import check_idempotency_key, check_recipient_count, check_stream_head, check_unary_count

VALIDATE_ONLY = "validate_only: planned, not sent"
ABANDONED = "the stream ended before this batch was sent; nothing was sent"


@dataclass(frozen=True, slots=True)
class SendLimits:
    """From `settings.Sending`, which holds their defaults."""

    unary_max_recipients: int
    request_concurrency: int
    result_queue_size: int


class _Policy(Protocol):
    """What `_take_all` does with each closed batch and each rejected recipient."""

    async def batch(self, batch: Batch) -> None: ...

    async def rejected(self, taken: Taken) -> None: ...


async def _take_all(intake: Intake, recipients: Iterable[Mapping[str, Any]], policy: _Policy) -> None:
    """The one loop both use cases share: every recipient checked, encoded and batched once."""
    for recipient in recipients:
        taken = intake.take(recipient)
        if taken.violations:
            await policy.rejected(taken)
        elif taken.closed is not None:
            await policy.batch(taken.closed)


class _Taking:
    """What a Send and a SendStream share: the `Intake` their recipients go through, in order."""

    def __init__(self, intake: Intake, context: RequestContext) -> None:
        self._intake = intake
        self.context = context
        """The request's context (a stream's: whether it is keyed decides how its end is told,
        `edge.streams`)."""

    @property
    def context_name(self) -> str:
        """What the recipients' context object is called in the bodies (`Intake.context_name`)."""
        return self._intake.context_name

    @property
    def encoded_limit(self) -> int:
        """The largest recipient, as JSON, the compiled path may hand over (`Intake.encoded_limit`)."""
        return self._intake.encoded_limit

    @property
    def received(self) -> int:
        """Recipients taken so far: the position the next one will have."""
        return self._intake.received


class UnarySend(_Taking):
    """One unary Send, all or nothing: `take` its recipients (or `take_encoded`), then
    `Sender.send` it.

    Its own policy for the shared loop: it gathers the batches and every violation, and the
    request is decided at the end."""

    def __init__(self, intake: Intake, context: RequestContext) -> None:
        super().__init__(intake, context)
        self._batches: list[Batch] = []
        self._violations: list[Violation] = []

    @property
    def head(self) -> Mapping[str, Any]:
        """The request's top-level fields, as the caller sent them."""
        return self._intake.head

    async def take(self, recipients: Iterable[Mapping[str, Any]]) -> None:
        """Check, encode and plan the request's recipients, in order."""
        await _take_all(self._intake, recipients, self)

    def take_encoded(self, encoded: Iterable[bytes]) -> None:
        """`take` for recipients checked and encoded already (`Intake.take_encoded`)."""
        take = self._intake.take_encoded
        for each in encoded:
            closed = take(each)
            if closed is not None:
                self._batches.append(closed)

    async def batch(self, batch: Batch) -> None:
        self._batches.append(batch)

    async def rejected(self, taken: Taken) -> None:
        self._violations.extend(taken.violations)

    def planned(self) -> list[Batch]:
        """The batches to send; InvalidRequest with every violation of the request if it has any."""
        intake = self._intake
        last = intake.finish()
        if last is not None:
            self._batches.append(last)
        violations = [
            *intake.head_violations,
            *check_recipient_count(intake.head, intake.received),
            *self._violations,
            *check_idempotency_key(self.context.key),
        ]
        if violations:
            raise InvalidRequest(violations)
        return self._batches or [intake.broadcast()]


class Sender:
    """Runs Send and SendStream requests for authenticated tenants."""

    def __init__(self, dispatcher: Dispatcher, limits: SendLimits, metrics: Metrics | None = None) -> None:
        self._dispatcher = dispatcher
        self._limits = limits
        self._metrics = metrics or Metrics()
        self.replayer = Replayer(dispatcher, self._metrics)
        """The acknowledged replay of UNKNOWN batches (`replaying`)."""

    def open_send(self, context: RequestContext, head: Mapping[str, Any]) -> UnarySend:
        """A unary Send with this head, to `take` its recipients into and then `send`."""
        tenant = context.tenant
        intake = Intake(head, tenant.context_name, tenant.audience_budget, context.lane or TRANSACTIONAL)
        return UnarySend(intake, context)

    async def send(self, unary: UnarySend) -> tuple[list[BatchResult], Summary]:
        """Check the whole request, reporting every violation at once; then send it, within the
        context's deadline (time.monotonic, see Dispatcher.send)."""
        context = unary.context
        self.check_unary_count(unary.received)
        batches = unary.planned()
        authorize(context.tenant, unary.head)
        if context.validate_only:
            done = [results.not_attempted(batch, VALIDATE_ONLY) for batch in batches]
            for batch, result in zip(batches, done, strict=True):
                reporting.made(self._metrics, context, result)
                self.recorder.record(context, result, batch)
        else:
            done = await self._run_all(context, batches)
        done.sort(key=lambda result: result.batch_index)
        # Not flushed before the answer: on this process GetResults flushes before it reads, and
        # the writer has them in every process's store within FLUSH_SECONDS. Waiting for that
        # write made a Send slower (bench/unary_overhead, p50 overhead: 3.06 ms with it, 1.88 without).
        summary = Summary()
        for result in done:
            summary.add(result)
        return done, summary

    @property
    def recorder(self) -> Recorder:
        """Where every result is kept for GetResults (the dispatcher's)."""
        return self._dispatcher.recorder

    def check_unary_count(self, count: int) -> None:
        """Refuse a Send over the cap, before its recipients cost any work."""
        violations = check_unary_count(count, self._limits.unary_max_recipients)
        if violations:
            raise InvalidRequest(violations)

    async def _run_all(self, context: RequestContext, batches: list[Batch]) -> list[BatchResult]:
        if len(batches) == 1:  # most Sends: one call, no fan-out (its tasks and queue cost latency)
            result = await self._dispatcher.send(context, batches[0])
            reporting.made(self._metrics, context, result)
            self.recorder.record(context, result, batches[0])
            return [result]
        fan = FanOut(
            self._dispatcher, context, self._limits.request_concurrency, len(batches) + 1, self._metrics
        )

        async def produce() -> None:
            try:
                for batch in batches:
                    await fan.submit(batch)
            finally:
                await fan.close()

        producer = asyncio.create_task(produce())
        try:
            done = [result async for result in fan.results()]
            await producer
            return done
        finally:
            producer.cancel()
            fan.cancel()

    def open_stream(self, context: RequestContext, head: Mapping[str, Any]) -> StreamSend:
        """Check a stream's header; raises InvalidRequest or PermissionDenied before anything is sent."""
        tenant = context.tenant
        intake = Intake(head, tenant.context_name, tenant.audience_budget, context.lane or BULK)
        violations = [*check_stream_head(head), *intake.head_violations, *check_idempotency_key(context.key)]
        if violations:
            raise InvalidRequest(violations)
        authorize(tenant, head)
        limits = self._limits
        fan = FanOut(
            self._dispatcher, context, limits.request_concurrency, limits.result_queue_size, self._metrics
        )
        return StreamSend(intake, fan, context)


class StreamSend(_Taking):
    """One SendStream: `feed` recipients in order, then `close`; read `results` meanwhile.

    It is its own policy for the shared loop: batches go out as they close, and a rejected
    recipient gets a result of its own while the others go on.
    """

    def __init__(self, intake: Intake, fan: FanOut, context: RequestContext) -> None:
        super().__init__(intake, context)
        self._fan = fan
        self.summary = Summary()

    async def feed(self, recipients: Iterable[Mapping[str, Any]]) -> None:
        """Plan the next recipients; waits while the stream's batches are all in flight."""
        await _take_all(self._intake, recipients, self)

    async def feed_encoded(self, encoded: Iterable[bytes]) -> None:
        """`feed` for recipients checked and encoded already (`Intake.take_encoded`)."""
        take = self._intake.take_encoded
        for each in encoded:
            closed = take(each)
            if closed is not None:
                await self.batch(closed)

    async def batch(self, batch: Batch) -> None:
        if self.context.validate_only:
            await self._fan.put(results.not_attempted(batch, VALIDATE_ONLY), batch)
        else:
            await self._fan.submit(batch)

    async def rejected(self, taken: Taken) -> None:
        result = results.rejected_recipient(self._intake.reserve_index(), taken.position, taken.violations)
        await self._fan.put(result)

    def log_unread(self, handed: Iterable[BatchResult]) -> None:
        """The stream was cut off: log the last results handed to gRPC, which its caller may not
        have read, for reconciliation."""
        self._fan.log_unread(handed)

    def log_undelivered(self, result: BatchResult) -> None:
        """A result taken from `results` but never handed to gRPC (the stream was cut off between
        the two): logged, for reconciliation, as one its caller will never get."""
        self._fan.log_undelivered(result)

    @property
    def quiet_since(self) -> float | None:
        """When the stream's last batch in flight ended (time.monotonic); None while one is."""
        return self._fan.quiet_since

    @property
    def holds_partial_batch(self) -> bool:
        """`close` would send a batch of fewer than 50 that is still open."""
        return self._intake.open

    def check_complete(self) -> None:
        """At the caller's end of input: a stream must have carried recipients."""
        violations = check_recipient_count(self._intake.head, self._intake.received)
        if violations:
            raise InvalidRequest(violations)

    async def close(self, *, send_rest: bool = True) -> None:
        """Send the last partial batch (or, after an error, report it unsent), wait, end `results`."""
        try:
            last = self._intake.finish()
            if last is not None and send_rest:
                await self.batch(last)
            elif last is not None:
                await self._fan.put(results.not_attempted(last, ABANDONED, code=Code.ABORTED), last)
        finally:
            await self._fan.close()

    async def results(self) -> AsyncIterator[BatchResult]:
        async for result in self._fan.results():
            self.summary.add(result)
            yield result
        await self._fan.recorder.flush()  # kept before the summary: GetResults finds them

    def cancel(self) -> None:
        self._fan.cancel()
