"""The send use cases, free of gRPC: a unary Send, and a SendStream session.

Both follow the same path: Intake (validate, encode, batch) -> tenant authorization ->
FanOut (limits, retries, REST) -> results. Unary validates everything before sending
anything; a stream validates its header first, then each recipient as it arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import results
from .dispatch import Dispatcher, FanOut, report
from .errors import InvalidRequest
from .metrics import Metrics
from .model import Batch, BatchResult, Code, Rule, Summary, Violation
from .planning import Intake, authorize
from .tenants import Tenant
from .validate import ContextNames, check_recipient, check_recipient_count

VALIDATE_ONLY = "validate_only: planned, not sent"
ABANDONED = "the stream ended before this batch was sent; nothing was sent"


@dataclass(frozen=True, slots=True)
class SendLimits:
    unary_max_recipients: int = 10_000
    request_concurrency: int = 8
    result_queue_size: int = 64


class Sender:
    """Runs Send and SendStream requests for authenticated tenants."""

    def __init__(self, dispatcher: Dispatcher, limits: SendLimits, metrics: Metrics | None = None) -> None:
        self._dispatcher = dispatcher
        self._limits = limits
        self._metrics = metrics or Metrics()

    async def send(
        self,
        tenant: Tenant,
        head: Mapping[str, Any],
        recipients: Sequence[Mapping[str, Any]],
        validate_only: bool,
    ) -> tuple[list[BatchResult], Summary]:
        """Validate the whole request, then send it; results in batch order."""
        self.check_unary_count(len(recipients))
        try:
            intake = Intake(head)
        except InvalidRequest as invalid:  # report the recipients' violations too, all at once
            names = ContextNames(head)
            found = [*invalid.violations, *check_recipient_count(head, len(recipients))]
            for index, recipient in enumerate(recipients):
                path = f"recipients[{index}]"
                found.extend(check_recipient(recipient, path) or names.check(recipient, path))
            raise InvalidRequest(found) from None
        violations = check_recipient_count(head, len(recipients))
        batches: list[Batch] = []
        for recipient in recipients:
            _, out = intake.take(recipient)
            if isinstance(out, list):
                violations.extend(out)
            elif out is not None:
                batches.append(out)
        last = intake.finish()
        if last is not None:
            batches.append(last)
        if violations:
            raise InvalidRequest(violations)
        authorize(tenant, head)
        if not recipients:
            batches = [intake.broadcast()]
        if validate_only:
            done = [results.not_attempted(batch, VALIDATE_ONLY) for batch in batches]
            for result in done:
                report(self._metrics, tenant, result)
        else:
            done = await self._run_all(tenant, batches)
        done.sort(key=lambda result: result.batch_index)
        summary = Summary()
        for result in done:
            summary.add(result)
        return done, summary

    def check_unary_count(self, count: int) -> None:
        """Refuse a Send over the cap, before its recipients cost any work."""
        cap = self._limits.unary_max_recipients
        if count > cap:
            raise InvalidRequest(
                [
                    Violation(
                        "recipients",
                        f"at most {cap:,} per Send; use SendStream for more",
                        Rule.TOO_MANY_RECIPIENTS,
                    )
                ]
            )

    async def _run_all(self, tenant: Tenant, batches: list[Batch]) -> list[BatchResult]:
        fan = FanOut(
            self._dispatcher, tenant, self._limits.request_concurrency, len(batches) + 1, self._metrics
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

    def open_stream(self, tenant: Tenant, head: Mapping[str, Any], validate_only: bool) -> StreamSend:
        """Check a stream's header; raises InvalidRequest or PermissionDenied before anything is sent."""
        if head.get("broadcast") is True:
            raise InvalidRequest(
                [Violation("broadcast", "SendStream does not broadcast; use Send", Rule.STREAM_BROADCAST)]
            )
        intake = Intake(head)
        authorize(tenant, head)
        fan = FanOut(
            self._dispatcher,
            tenant,
            self._limits.request_concurrency,
            self._limits.result_queue_size,
            self._metrics,
        )
        return StreamSend(intake, fan, validate_only)


class StreamSend:
    """One SendStream: `feed` recipients in order, then `close`; read `results` meanwhile."""

    def __init__(self, intake: Intake, fan: FanOut, validate_only: bool) -> None:
        self._intake = intake
        self._fan = fan
        self._validate_only = validate_only
        self.summary = Summary()

    @property
    def received(self) -> int:
        """Recipients read so far: the position the next one will have."""
        return self._intake.received

    async def feed(self, recipients: Iterable[Mapping[str, Any]]) -> None:
        """Plan the next recipients; waits while the stream's batches are all in flight."""
        intake = self._intake
        for recipient in recipients:
            position, out = intake.take(recipient)
            if out is None:
                continue
            if isinstance(out, list):
                await self._fan.put(results.rejected_recipient(intake.reserve_index(), position, tuple(out)))
            else:
                await self._dispatch(out)

    async def _dispatch(self, batch: Batch) -> None:
        if self._validate_only:
            await self._fan.put(results.not_attempted(batch, VALIDATE_ONLY))
        else:
            await self._fan.submit(batch)

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
                await self._dispatch(last)
            elif last is not None:
                await self._fan.put(results.not_attempted(last, ABANDONED, code=Code.ABORTED))
        finally:
            await self._fan.close()

    async def results(self) -> AsyncIterator[BatchResult]:
        async for result in self._fan.results():
            self.summary.add(result)
            yield result

    def cancel(self) -> None:
        self._fan.cancel()
