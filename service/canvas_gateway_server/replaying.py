"""Replay: the owner's deliberate way out of UNKNOWN, free of gRPC.

An UNKNOWN batch may have reached Braze, so the gateway never sends it again by itself (Braze
has no idempotency key: CONTRACT.md section 6). Its exact body is kept with its result
(`outcomes`), and `Replayer.replay` sends it again only when the caller names the request and
the batches (or all its UNKNOWN ones) and acknowledges that a recipient may get the Canvas
twice. Without the acknowledgement nothing is sent (`NotAcknowledged`).

Each batch is sent again at most once: it is claimed under an idempotency scope of its own,
`replay#<request id>` (a key no caller can give: `#` is not allowed in keys), through the same
`Ledger` as keyed sends, so two replays at once, on any replica, send it once; a later replay
gets the kept result back (`replayed`), never a third send. A replay that ends with nothing sent
(NOT_ATTEMPTED, a 429...) releases its claim, as a keyed send does, and may be asked again. The
new result and the decision (the replay's request id) are kept in place of the UNKNOWN one,
under the original request id and key, and the batch leaves the tenant's UNKNOWN list.
"""

from __future__ import annotations

from collections.abc import Collection

from . import reporting
from .context import IdempotencyScope, RequestContext
from .dispatch import Dispatcher
from .errors import InvalidRequest, NotAcknowledged, NotKept
from .metrics import Metrics
from .model import BatchResult, Code, Outcome, Rule, Summary, Violation
from .outcomes import Kept, Origin

REPLAY_SCOPE = "replay#"


class Replayer:
    """Sends kept UNKNOWN batches again, once each, for a caller who acknowledged duplicates."""

    def __init__(self, dispatcher: Dispatcher, metrics: Metrics | None = None) -> None:
        self._dispatcher = dispatcher
        self._recorder = dispatcher.recorder
        self._metrics = metrics or Metrics()

    async def replay(
        self, context: RequestContext, handle: str, indexes: Collection[int], acknowledged: bool
    ) -> tuple[list[BatchResult], Summary]:
        """Send again the request's batches `indexes` (empty: every UNKNOWN one); each answered
        like a send's batch. Raises NotAcknowledged, NotKept or InvalidRequest, nothing sent."""
        if not acknowledged:
            raise NotAcknowledged(
                "a replay sends again batches that may already have reached Braze, so a recipient may "
                "get the Canvas twice: set acknowledge_duplicates to send them; nothing was sent"
            )
        tenant = context.tenant.id
        kept = await self._recorder.read(tenant, handle) if self._recorder.enabled else []
        if not kept:
            raise NotKept("no result is kept for that request (unknown, another tenant's, or past its time)")
        by_index = {item.result.batch_index: item for item in kept}
        missing = sorted(set(indexes) - by_index.keys())
        if missing:
            raise InvalidRequest(
                [
                    Violation("batch_indexes", f"the request has no batch {n} kept", Rule.LOOKUP)
                    for n in missing
                ]
            )
        if indexes:
            chosen = [by_index[n] for n in sorted(set(indexes))]
        else:
            chosen = [item for item in kept if item.result.outcome is Outcome.UNKNOWN]
        done = [await self._one(context, item) for item in chosen]
        await self._recorder.flush()
        summary = Summary()
        for result in done:
            summary.add(result)
        return done, summary

    async def _one(self, context: RequestContext, item: Kept) -> BatchResult:
        batch = item.batch
        if batch is None:  # not UNKNOWN: it is not sent again
            outcome = item.result.outcome.name
            return BatchResult(
                item.result.batch_index,
                item.result.positions,
                Outcome.REJECTED,
                Code.FAILED_PRECONDITION,
                f"batch {item.result.batch_index} ended {outcome}, not UNKNOWN: it is not sent again",
            )
        origin = item.origin
        scope = IdempotencyScope(context.tenant.id, REPLAY_SCOPE + origin.request_id)
        replaying = RequestContext(
            context.tenant, context.deadline, scope, context.request_id, lane=batch.lane
        )
        result = await self._dispatcher.send(replaying, batch)
        reporting.made(self._metrics, replaying, result)
        sent_now = not result.replayed and result.outcome is not Outcome.NOT_ATTEMPTED
        # Sent now: the new result and the decision take the UNKNOWN one's place. Else (replayed
        # from an earlier replay, or nothing sent) only the replay's own request id keeps it.
        decided = Origin(origin.request_id, origin.key, context.request_id if sent_now else "")
        self._recorder.record_replay(context.tenant.id, context.request_id, decided, result, batch)
        return result
