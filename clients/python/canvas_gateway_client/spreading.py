"""A send spread over several connections (`CanvasGatewayClient(connections=N)`), and the parts a
send under an idempotency key is cut into, whatever N.

The gateway runs CGW_WORKERS processes on one port, and the kernel hands each new connection to
one of them; gRPC shares one connection among the channels to one address, so one client lands
on one worker. With `connections=N` the client opens N connections of its own (a channel each,
with a local subchannel pool) and sends N parts of the input at once, a stream each.

Parts are the caller's positions cut every PART_SIZE (the header's recipients first): part `i`
is positions `i * PART_SIZE` to `(i + 1) * PART_SIZE - 1`, sent as its own SendStream. Under an
idempotency key KEY part 0 is sent under KEY itself and part `i` under `part_key(KEY, i)`. The
cut depends on the input alone, never on N, and a keyed send is cut so with one connection too
(its parts one after another): a send and its resend under KEY send the same requests under the
same keys whatever their N, so nothing is sent twice. A send of at most PART_SIZE recipients is
one request under KEY, as every client sends it.

Results carry the caller's positions; part `i`'s batch indexes start at `i * PART_SIZE`. With
`ordered` they are yielded in position order (each once every position before it has its
result); else as they come. When the send took more than one part, the summary adds the parts'
summaries up and lists their request ids, comma-separated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from canvas_gateway.v1 import canvas_gateway_pb2 as pb

from .recipients import Recipients, RecipientSource, _aiter_any, _once, _rereadable, to_recipient
from .tracking import _OUTCOME_COUNTS, Tracked, _rename

PART_SIZE: Final = 5_000
"""Recipients a part (100 batches of 50). Fixed: the parts of a keyed send must be the same in
its resend, so it is no setting."""
MAX_KEY_LENGTH: Final = 128


def part_key(key: str, index: int) -> str:
    """The idempotency key of part `index` of a send under `key`: `key` for part 0, else
    `<key>.part-<index>` (a 128-character limit: a long key is replaced by a digest of it)."""
    if index == 0:
        return key
    suffix = f".part-{index}"
    if len(key) + len(suffix) > MAX_KEY_LENGTH:
        key = "k-" + hashlib.blake2b(key.encode(), digest_size=24).hexdigest()
    return key + suffix


@dataclass
class Part:
    """Part `index` of a send: the caller's positions from `start`, and (after part 0) its
    recipients, held in memory so that a keyed resume sends them again."""

    index: int
    start: int
    recipients: list[pb.Recipient] = field(default_factory=list)


class SendPart(Protocol):
    """Sends one part on connection `connection` under `key` (None: no key), yielding its
    results in the part's own positions and batch indexes, then its summary."""

    def __call__(
        self,
        connection: int,
        trigger: pb.CanvasTrigger,
        recipients: RecipientSource,
        key: str | None,
        timeout: float | None,
    ) -> AsyncGenerator[Tracked, None]: ...


class _Reader:
    """Reads the caller's recipients once, in its own task, into parts: part 0 is handed out as
    it is read (a stream sends it meanwhile), the later parts whole, through `parts`, at most
    `ahead` waiting. A failure to read or parse ends the input; it is kept in `failure`."""

    def __init__(self, recipients: Recipients, first_size: int, ahead: int) -> None:
        self._recipients = recipients
        self._first_size = first_size
        self.first: list[pb.Recipient] = []
        self.first_done = first_size <= 0
        self.changed = asyncio.Condition()
        self.parts: asyncio.Queue[Part | None] = asyncio.Queue(maxsize=ahead)
        self.failure: Exception | None = None

    async def run(self, first_start: int, runners: int) -> None:
        part = Part(1, first_start + self._first_size)
        try:
            async for item in _aiter_any(self._recipients):
                recipient = to_recipient(item)
                if not self.first_done:
                    self.first.append(recipient)
                    self.first_done = len(self.first) >= self._first_size
                    async with self.changed:
                        self.changed.notify_all()
                    continue
                part.recipients.append(recipient)
                if len(part.recipients) >= PART_SIZE:
                    await self.parts.put(part)
                    part = Part(part.index + 1, part.start + PART_SIZE)
        except Exception as exc:  # raised to the caller after the summary
            self.failure = exc
        self.first_done = True
        async with self.changed:
            self.changed.notify_all()
        if part.recipients:
            await self.parts.put(part)
        for _ in range(runners):
            await self.parts.put(None)

    async def first_part(self) -> AsyncIterator[pb.Recipient]:
        """Part 0's recipients from the source, from the first, as they are read."""
        sent = 0
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda sent=sent: sent < len(self.first) or self.first_done)  # type: ignore[misc]
            if sent >= len(self.first):
                return
            upto = len(self.first)
            for recipient in self.first[sent:upto]:
                yield recipient
            sent = upto


async def _unless(getting: Awaitable[Part | None], stopped: asyncio.Event) -> Part | None:
    """The next part, or None once the send stops (a part failed) before one comes."""
    get, stop = asyncio.ensure_future(getting), asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait((get, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        get.cancel()
    return None if stopped.is_set() or get.cancelled() else get.result()


def _retrieved(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # a failure no part read is not worth a warning


def _shift(tracked: Tracked, part: Part) -> Tracked:
    """A part's result in the caller's positions and the send's batch indexes."""
    result = tracked.response.result
    if part.start:
        for old in result.positions:  # a rejected recipient's violations name it by its position
            _rename(result, f"recipients[{old}]", f"recipients[{old + part.start}]")
        positions = [p + part.start for p in result.positions]
        del result.positions[:]
        result.positions.extend(positions)
    result.batch_index += part.index * PART_SIZE
    return tracked


def _total(summaries: list[pb.SendSummary]) -> Tracked:
    """The one summary of a send: its only part's, or every part's added up."""
    if len(summaries) == 1:
        return Tracked(pb.SendStreamResponse(summary=summaries[0]), ())
    total = pb.SendSummary(request_id=",".join(s.request_id for s in summaries if s.request_id))
    for name in ("recipients", "batches", *_OUTCOME_COUNTS.values()):
        setattr(total, name, sum(getattr(s, name) for s in summaries))
    return Tracked(pb.SendStreamResponse(summary=total), ())


class _InOrder:
    """Results held until every position before theirs has its result."""

    def __init__(self) -> None:
        self.next = 0  # the first position without a result yielded
        self._done: set[int] = set()  # positions past `next` with a result yielded
        self._heap: list[tuple[int, int, Tracked]] = []
        self._count = 0
        self.moved = asyncio.Event()

    def add(self, tracked: Tracked) -> list[Tracked]:
        positions = tracked.response.result.positions
        first = min(positions) if positions else self.next
        self._count += 1
        heapq.heappush(self._heap, (first, self._count, tracked))
        ready: list[Tracked] = []
        while self._heap and self._heap[0][0] <= self.next:
            _, _, top = heapq.heappop(self._heap)
            ready.append(top)
            self._done.update(top.response.result.positions)
            while self.next in self._done:
                self._done.discard(self.next)
                self.next += 1
        if ready:
            self.moved.set()
        return ready

    def rest(self) -> list[Tracked]:
        """What is held, in position order: the send ended with positions without a result."""
        held = [tracked for _, _, tracked in sorted(self._heap)]
        self._heap.clear()
        return held


async def spread(
    send_part: SendPart,
    connections: int,
    trigger: pb.CanvasTrigger,
    recipients: RecipientSource,
    key: str | None,
    timeout: float | None,  # noqa: ASYNC109 - the send's deadline
    ordered: bool,
    before_later_parts: Callable[[], Awaitable[None]] | None = None,
) -> AsyncGenerator[Tracked, None]:
    """Send `trigger` and `recipients` in parts over `connections` connections (see the module).
    `before_later_parts` is awaited once, before part 1 is sent; an error it raises stops the
    send as a failed part's does."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    again = _rereadable(recipients)
    heads = len(trigger.recipients)
    reader = _Reader(again() if again is not None else _once(recipients), PART_SIZE - heads, connections)
    head = pb.CanvasTrigger()
    head.CopyFrom(trigger)
    del head.recipients[:]
    order = _InOrder() if ordered else None
    out: asyncio.Queue[tuple[Tracked, Part] | Exception | None] = asyncio.Queue(maxsize=1_000)
    stopped = asyncio.Event()
    window = 2 * connections * PART_SIZE  # ordered: how far past `order.next` a part may start

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - loop.time())

    checked: asyncio.Future[None] | None = None

    async def check_once() -> None:
        nonlocal checked
        if before_later_parts is not None:
            if checked is None:
                checked = asyncio.ensure_future(before_later_parts())
            await asyncio.shield(checked)

    async def run_part(connection: int, part: Part, source: RecipientSource, on: pb.CanvasTrigger) -> None:
        keyed = None if key is None else part_key(key, part.index)
        async with contextlib.aclosing(send_part(connection, on, source, keyed, left())) as results:
            async for tracked in results:
                await out.put((tracked, part))

    async def runner(connection: int) -> None:
        try:
            if connection == 0:  # part 0 goes first, sent as it is read
                first: RecipientSource = reader.first_part if again is not None else reader.first_part()
                await run_part(0, Part(0, 0), first, trigger)
            while not stopped.is_set():
                part = await _unless(reader.parts.get(), stopped)
                if part is None:
                    break
                while order is not None and part.start > order.next + window and not stopped.is_set():
                    order.moved.clear()
                    await order.moved.wait()
                await check_once()
                await run_part(connection, part, part.recipients, head)
        except Exception as exc:
            stopped.set()
            if order is not None:
                order.moved.set()  # a runner waiting for the order to move stops too
            await out.put(exc)
        finally:
            await out.put(None)

    reading = asyncio.create_task(reader.run(heads, connections))
    tasks = [asyncio.create_task(runner(c)) for c in range(connections)]
    summaries: list[tuple[int, pb.SendSummary]] = []
    error: Exception | None = None
    try:
        running = connections
        while running:
            item = await out.get()
            if item is None:
                running -= 1
                continue
            if isinstance(item, Exception):
                error = error or item
                continue
            tracked, part = item
            if tracked.response.HasField("summary"):
                summaries.append((part.index, tracked.response.summary))
                continue
            shifted = _shift(tracked, part)
            for ready in order.add(shifted) if order is not None else (shifted,):
                yield ready
        for held in order.rest() if order is not None else ():
            yield held
        if error is not None:
            if reader.failure is not None:
                raise reader.failure from error
            raise error
        yield _total([summary for _, summary in sorted(summaries, key=lambda s: s[0])])
        if reader.failure is not None:
            raise reader.failure
    finally:
        stopped.set()
        for task in (*tasks, reading):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Not awaited: a read under way (a thread reading stdin) ends when it ends.
        reading.add_done_callback(_retrieved)
