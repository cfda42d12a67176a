"""The results of one `send_stream` under an idempotency key across the streams it takes (see `_Keyed`)."""

from __future__ import annotations

import collections
from collections.abc import Iterator

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.rpc import error_details_pb2

from .tracking import _OUTCOME_COUNTS, MAX_HELD_RESULTS, RESUME_BACKOFF_SECONDS, Tracked, _Stream, summary

_UNSEEN, _STANDS, _OPEN = 0, 1, 2
"""What `_Keyed` has yielded for a batch index: nothing, a result that stands, one that may not."""


def _stands(result: pb.BatchResult) -> bool:
    """Whether the gateway keeps the result under the key, so that every later stream replays it:
    SENT and UNKNOWN (it may have been sent). The others (NOT_ATTEMPTED, CANVAS_INACTIVE, REJECTED:
    nothing was sent) are sent again by a later stream with the key."""
    return result.outcome in (pb.OUTCOME_SENT, pb.OUTCOME_UNKNOWN)


def _retry_delay(result: pb.BatchResult) -> float | None:
    """The google.rpc.RetryInfo delay of a result, in seconds; None without one."""
    for detail in result.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


class _Keyed:
    """The state of one `send_stream` with an idempotency key across the streams it takes.

    Every stream sends every recipient from position 0, in the same order, under the same key, so
    positions and batch indexes are the gateway's own and the same in each stream: a batch that
    already has a result that stands comes back replayed and is dropped here. Retryable
    NOT_ATTEMPTED results are held back, by batch index, while a resume is possible (the next
    stream gives the batch its next result). A result that did not stand and was yielded anyway
    (held past MAX_HELD_RESULTS, CANVAS_INACTIVE, a REJECTED) is followed by the batch's
    later result if a later stream sends it (SENT, UNKNOWN...): the only batch yielded twice, and
    counted once, by its last result. Memory: a byte per batch, and the held results.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.resumes = 0
        self.yielded = bytearray()  # batch index -> _UNSEEN, _STANDS or _OPEN
        self.open: dict[int, tuple[pb.Outcome.ValueType, int]] = {}  # _OPEN index -> outcome, recipients
        self.held: dict[int, Tracked] = {}  # batch index -> result held back, oldest first
        self.counts: collections.Counter[str] = collections.Counter()
        self.request_ids: list[str] = []
        self.forgotten: int | None = None
        """A batch whose result stood and that came back sent again: the gateway lost the key."""

    def take(self, stream: _Stream, result: pb.BatchResult) -> Iterator[Tracked]:
        """The result, unless its batch has one already or it is held back (then maybe an older one)."""
        entries = [stream.pending.pop(p) for p in result.positions]
        index = result.batch_index
        if index >= len(self.yielded):
            self.yielded.extend(bytes(index + 1 - len(self.yielded)))
        seen = self.yielded[index]
        if seen == _STANDS:
            if not result.replayed and result.outcome in (pb.OUTCOME_SENT, pb.OUTCOME_UNKNOWN):
                self.forgotten = index if self.forgotten is None else self.forgotten
            return
        tracked = Tracked(pb.SendStreamResponse(result=result), tuple(r for _, r in entries))
        if seen == _OPEN:
            if _stands(result):  # sent after all (or by another call): it replaces the result yielded
                outcome, count = self.open.pop(index)
                self.counts[_OUTCOME_COUNTS.get(outcome, "")] -= count
                self.counts[_OUTCOME_COUNTS.get(result.outcome, "")] += count
                self.yielded[index] = _STANDS
                yield tracked
            return
        self.held.pop(index, None)
        if result.outcome == pb.OUTCOME_NOT_ATTEMPTED and result.retryable and self.resumes < self.limit:
            self.held[index] = tracked
            if len(self.held) > MAX_HELD_RESULTS:
                oldest = next(iter(self.held))
                yield self.count(self.held.pop(oldest))
        else:
            yield self.count(tracked)

    def count(self, tracked: Tracked) -> Tracked:
        result = tracked.response.result
        size = len(result.positions)
        self.counts["recipients"] += size
        self.counts["batches"] += 1
        self.counts[_OUTCOME_COUNTS.get(result.outcome, "")] += size
        if _stands(result):
            self.yielded[result.batch_index] = _STANDS
        else:
            self.yielded[result.batch_index] = _OPEN
            self.open[result.batch_index] = (result.outcome, size)
        return tracked

    def release(self) -> Iterator[Tracked]:
        """The held results as they are: no resume will send their batches again."""
        while self.held:
            yield self.count(self.held.pop(next(iter(self.held))))

    def busy_delay(self) -> float | None:
        """When a held batch that another call was sending (ABORTED) may be tried again: the
        longest of their RetryInfo delays; None when no held batch is one of those."""
        delays = [
            _retry_delay(held.response.result) or RESUME_BACKOFF_SECONDS
            for held in self.held.values()
            if held.response.result.code == grpc.StatusCode.ABORTED.value[0]
        ]
        return max(delays) if delays else None

    def summary(self, last: pb.SendSummary | None) -> Tracked:
        """The gateway's summary; after a resume, the count of every batch's result, once each,
        and each stream's request id, comma-separated."""
        return summary(self.resumes, last, self.counts, self.request_ids)
