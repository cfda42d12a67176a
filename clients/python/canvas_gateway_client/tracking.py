"""The results of one `send_stream` across the streams it takes, in the caller's terms.

`Tracked` is a response with the recipients of its result. `_Stream` holds one stream's
recipients without a result yet; `_Resumable` rewrites each stream's results to the caller's
positions and holds back the retryable ones a resume will send again; `summary` counts what was
yielded when a send took more than one stream. `_Keyed` (keyed.py) is the same for a send under
an idempotency key.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

from canvas_gateway.v1 import canvas_gateway_pb2 as pb

MAX_HELD_RESULTS = 64
"""Retryable NOT_ATTEMPTED results held back for a resume at most (<= 3,200 recipients kept):
past it the oldest is yielded as it is, so memory stays flat even when Braze is down."""
RESUME_BACKOFF_SECONDS = 0.25
"""The first pause before a resume; it doubles with each resume, up to 5 seconds."""


class Tracked(NamedTuple):
    """A stream response with the recipients of its result, in the order of `result.positions`
    (empty for the summary). Yielded by `CanvasGatewayClient.send_stream_tracked`."""

    response: pb.SendStreamResponse
    recipients: tuple[pb.Recipient, ...]


_OUTCOME_COUNTS = {
    pb.OUTCOME_SENT: "recipients_sent",
    pb.OUTCOME_REJECTED: "recipients_rejected",
    pb.OUTCOME_UNKNOWN: "recipients_unknown",
    pb.OUTCOME_NOT_ATTEMPTED: "recipients_not_attempted",
    pb.OUTCOME_CANVAS_INACTIVE: "recipients_canvas_inactive",
}


class _Stream:
    """One stream's recipients without a result yet: its position -> (the caller's position,
    the recipient). It holds what is in flight, no more, so memory stays flat."""

    def __init__(self, batch_offset: int) -> None:
        self.pending: dict[int, tuple[int, pb.Recipient]] = {}
        self.sent = 0
        self.batch_offset = batch_offset
        self.stop = asyncio.Event()

    def track(self, entries: Sequence[tuple[int, pb.Recipient]]) -> pb.SendStreamRequest:
        """A chunk of `entries` (the caller's position, recipient), noted as sent."""
        for entry in entries:
            self.pending[self.sent] = entry
            self.sent += 1
        return pb.SendStreamRequest(chunk=pb.RecipientChunk(recipients=[r for _, r in entries]))


class _Resumable:
    """The state of one `send_stream` across the streams it takes.

    Results are rewritten to the caller's positions (and to batch indexes that go on across
    streams); retryable NOT_ATTEMPTED ones are held back while a resume is possible, to be sent
    again rather than reported.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.resumes = 0
        self.stream = _Stream(0)
        self.next_batch = 0
        self.held: collections.deque[Tracked] = collections.deque()
        self.counts: collections.Counter[str] = collections.Counter()
        self.request_ids: list[str] = []

    def new_stream(self) -> _Stream:
        self.stream = _Stream(self.next_batch)
        return self.stream

    def take(self, result: pb.BatchResult) -> Iterator[Tracked]:
        """The result in the caller's terms, unless it is held back (then maybe an older one)."""
        entries = [self.stream.pending.pop(p) for p in result.positions]
        for old, (new, _) in zip(result.positions, entries, strict=True):
            if old != new:  # a rejected recipient's violations name it by its position
                _rename(result, f"recipients[{old}]", f"recipients[{new}]")
        del result.positions[:]
        result.positions.extend(position for position, _ in entries)
        result.batch_index += self.stream.batch_offset
        self.next_batch = max(self.next_batch, result.batch_index + 1)
        tracked = Tracked(pb.SendStreamResponse(result=result), tuple(r for _, r in entries))
        retry = result.outcome == pb.OUTCOME_NOT_ATTEMPTED and result.retryable
        if retry and self.resumes < self.limit:
            self.held.append(tracked)
            if len(self.held) > MAX_HELD_RESULTS:
                yield self.count(self.held.popleft())
        else:
            yield self.count(tracked)

    def count(self, tracked: Tracked) -> Tracked:
        result = tracked.response.result
        self.counts["recipients"] += len(result.positions)
        self.counts["batches"] += 1
        self.counts[_OUTCOME_COUNTS.get(result.outcome, "")] += len(result.positions)
        return tracked

    def release(self) -> Iterator[Tracked]:
        """The held results as they are: no resume will send their recipients again."""
        while self.held:
            yield self.count(self.held.popleft())

    def can_resume(self, resume_at: int | None) -> bool:
        """A drain at `resume_at` can be resumed: resumes are left, and every recipient the
        gateway read has its result (one read without a result is never sent again)."""
        return (
            resume_at is not None
            and self.resumes < self.limit
            and all(p >= resume_at for p in self.stream.pending)
        )

    def resume(self) -> list[tuple[int, pb.Recipient]]:
        """What the next stream sends first, in the caller's order: the recipients of the held
        results and those the gateway did not read."""
        self.resumes += 1
        entries = list(self.stream.pending.values())
        for held in self.held:
            entries.extend(zip(held.response.result.positions, held.recipients, strict=True))
        self.held.clear()
        return sorted(entries, key=lambda entry: entry[0])

    def summary(self, last: pb.SendSummary | None) -> Tracked:
        """The gateway's summary; after a resume, the counts of every stream's results and
        each stream's request id, comma-separated."""
        return summary(self.resumes, last, self.counts, self.request_ids)


def summary(
    resumes: int, last: pb.SendSummary | None, counts: Mapping[str, int], request_ids: Sequence[str]
) -> Tracked:
    """The gateway's summary `last` when the send took one stream; else the client's `counts` of
    the results it yielded, and each stream's request id, comma-separated."""
    if not resumes and last is not None:
        return Tracked(pb.SendStreamResponse(summary=last), ())
    total = pb.SendSummary(request_id=",".join(filter(None, request_ids)))
    for name in ("recipients", "batches", *_OUTCOME_COUNTS.values()):
        setattr(total, name, counts[name])
    return Tracked(pb.SendStreamResponse(summary=total), ())


def _rename(result: pb.BatchResult, old: str, new: str) -> None:
    for violation in result.violations:
        if violation.field.startswith(old):
            violation.field = new + violation.field[len(old) :]
    if result.status_message.startswith(old):
        result.status_message = new + result.status_message[len(old) :]
