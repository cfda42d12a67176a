"""A stream's machinery, apart from what the servicer decides: reading the caller's messages
(stopping at shutdown, draining what comes after), waiting for them within the idle timeout,
telling the requests' end (`StreamEnd`), and the results to write back in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Generic, Literal, TypeVar

import grpc

from ..errors import ShuttingDown, StreamIdle
from ..model import BatchResult
from ..sending import StreamSend

T = TypeVar("T")


class StreamReader(Generic[T]):
    """Reads a request stream one message at a time, and stops early when the gateway shuts down.

    A read cut short by shutdown stays pending, so `drain` can finish it: grpcio's request
    iterator must never be read twice at once.
    """

    def __init__(self, messages: AsyncIterator[T], stop: asyncio.Event) -> None:
        self._messages = messages
        self._stop = stop
        self._pending: asyncio.Future[T | None] | None = None
        self._draining: asyncio.Future[None] | None = None

    async def next(self) -> T | None:
        """The next message, None at the caller's end of stream; ShuttingDown once `stop` is set."""
        if self._pending is None:
            if self._stop.is_set() or self._draining is not None:
                raise ShuttingDown("the gateway is shutting down")
            self._pending = asyncio.ensure_future(anext(self._messages, None))
        if not self._pending.done():
            stopping = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait((self._pending, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
            if not self._pending.done():
                raise ShuttingDown("the gateway is shutting down")
        reading, self._pending = self._pending, None
        return reading.result()

    def drain(self) -> asyncio.Future[None]:
        """Read and drop, in a task of its own, what the caller still writes to a stream that
        reads no further, until the caller stops or `close`; started once, later calls return
        the same task.

        grpcio's asyncio client reports INTERNAL instead of the server's status when one of
        its writes fails because the server already ended the RPC (grpc/grpc#36066), and the
        writes of a caller whose stream nobody reads wait on flow control until then. Reading
        the rest lets such clients see the real status.
        """
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
        return self._draining

    async def _drain(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            if self._pending is not None:
                await self._pending
            async for _ in self._messages:
                pass

    def close(self) -> None:
        """Read no more: the RPC is ending."""
        for reading in (self._pending, self._draining):
            if reading is not None:
                reading.cancel()


async def next_message(reader: StreamReader[bytes], session: StreamSend, idle_seconds: float) -> bytes | None:
    """The caller's next message; StreamIdle once it has sent nothing for the idle timeout
    while none of the stream's batches was in flight (a caller may wait for their results)."""
    began = time.monotonic()
    wait = idle_seconds
    while True:
        try:
            async with asyncio.timeout(wait):
                return await reader.next()
        except TimeoutError:
            quiet = session.quiet_since
            wait = idle_seconds
            if quiet is not None:
                wait -= time.monotonic() - max(began, quiet)
                if wait <= 0:
                    raise StreamIdle(
                        f"the stream sent nothing for {idle_seconds:g} s: recipients from "
                        f"position {session.received} on were not read and NOT_ATTEMPTED batches were "
                        "not sent; send them again",
                        resume_position=session.received,
                    ) from None


async def results_to_write(
    session: StreamSend, end: StreamEnd, handed: deque[BatchResult]
) -> AsyncGenerator[BatchResult | None, None]:
    """The session's results as they come, and None (an empty message) once the requests end
    with a partial batch open. gRPC resumes this generator only after writing what it
    yielded, so going on past the None proves the caller half-closed (`StreamEnd`)."""
    results = aiter(session.results())
    upcoming: asyncio.Future[BatchResult | None] | None = asyncio.ensure_future(anext(results, None))
    stopped: asyncio.Task[Literal[True]] | None = asyncio.ensure_future(end.stopped.wait())
    try:
        while True:
            assert upcoming is not None
            if stopped is not None:
                await asyncio.wait((upcoming, stopped), return_when=asyncio.FIRST_COMPLETED)
                if stopped.done():
                    stopped = None
                    if end.awaits_proof:
                        yield None
                        end.prove(alive=True)
                    continue
            result = await upcoming
            upcoming = None  # taken: from here it is handed over, or the stream has ended
            if result is None:
                return
            handed.append(result)  # before the write: a write cut short may have gone out
            yield result
            upcoming = asyncio.ensure_future(anext(results, None))
    finally:
        if upcoming is not None:
            # Cut off after the session gave up a result and before it was handed to gRPC: it is
            # neither queued nor handed, so it is logged here as one its caller will never get.
            done = upcoming.done() and not upcoming.cancelled() and upcoming.exception() is None
            if done and (left := upcoming.result()) is not None:
                session.log_undelivered(left)
            upcoming.cancel()
        if stopped is not None:
            stopped.cancel()


class StreamEnd:
    """Whether a stream's requests ended with the caller's half-close, told by a write.

    grpcio ends the request iterator alike when the caller half-closes (END_STREAM) and when the
    stream is reset or its connection lost, and gives the servicer nothing else to tell them
    apart: the receive's outcome does not (grpc/grpc#26245: only C++ can ask core's
    `grpc_call_failed_before_recv_message`) and grpcio drops it anyway; `context.done()` means
    our own status went out and `context.cancelled()` that we set CANCELLED; the cancellation
    itself (the RECV_CLOSE_ON_SERVER op, on which grpcio cancels the handler's task) completes in
    a batch of its own, in no set order with the end of the requests, and when the task is
    inside gRPC's write it never reaches our code. A timer that waits for it loses under load.

    What gRPC does give: on a reset or a lost connection chttp2 closes the stream for writing
    before it ends its reads, and fails every later write ("Attempt to send message after
    stream was closed"). So a write begun after the requests ended that succeeds proves the end
    was a half-close. When a keyed stream's requests end with a partial batch open, the stream
    writes an empty `SendStreamResponse` (no part: clients skip it) and sends that batch only
    once the write has succeeded: a cut-off stream's write fails, its RPC ends, and the batch is
    never sent (the resume sends it). Streams without a key never get the empty message (callers
    written before it would take it for the summary), so for them no signal exists: their end is
    taken as the caller's, and a cut-off one may send its short last batch, or not, as the two
    events fall (tests/test_stream.py holds them to whole batches or the tail, none sent twice).
    A half-closed caller that does not read may hold its last batch until it reads, if its
    flow-control window is full.
    """

    def __init__(self) -> None:
        self.stopped = asyncio.Event()
        """The requests have ended, or reading them has stopped."""
        self.awaits_proof = False
        self._alive: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def half_closed(self, partial_batch: bool) -> bool:
        """At the end of the requests: may the last, partial batch be sent? With one open, waits
        until a write proves the caller there, or the RPC ends."""
        self.awaits_proof = partial_batch
        self.stopped.set()
        return await self._alive if partial_batch else True

    def prove(self, *, alive: bool) -> None:
        """What the write after the requests' end told; the first word stands."""
        if not self._alive.done():
            self._alive.set_result(alive)

    def rpc_done(self, _context: object) -> None:
        """The RPC ended before a write proved the caller there: the batch is not to be sent."""
        self.prove(alive=False)
