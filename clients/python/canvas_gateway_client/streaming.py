"""The streams of one `CanvasGatewayClient.send_stream`, and their resumes.

`resumable` goes on after a drain in a new stream with the recipients that have no result;
`keyed` (with an idempotency key) sends the whole sequence again from position 0 under the key
after a drain or a lost connection, or once batches another call was sending may be tried again.
Both yield `Tracked` results in the caller's terms (tracking.py, keyed.py); a send that waits
to resume tells `on_wait` with a `Waiting`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple, TypeAlias

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc

from .connection import _request_id
from .errors import KeyForgotten, resume_position
from .keyed import _Keyed
from .recipients import Recipients, _Source
from .tracking import RESUME_BACKOFF_SECONDS, Tracked, _Resumable, _Stream

KEYED_RESUME_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN})
"""How a stream with an idempotency key may end and be sent again from the start: a drain, a
lost connection (UNAVAILABLE), or a proxy's stream reset when its replica dies (UNKNOWN,
"Stream removed": the gateway itself never ends an RPC UNKNOWN). The key makes it safe."""
CORE_INTERNAL_DETAILS: Final = "Internal error from Core"
"""The details of the INTERNAL that grpcio's asyncio client reports itself when writing a request
fails, as on a connection lost mid-stream (the gateway's own INTERNAL says "internal error"): with
an idempotency key, resumed like KEYED_RESUME_CODES."""

log = logging.getLogger(__name__)


class Waiting(NamedTuple):
    """A send that waits before it goes on in a new stream, handed to `on_wait` (twice when the
    gateway does not come back: then with `gave_up` true, before the error is raised)."""

    cause: Literal["draining", "lost", "busy"]
    """Why: `draining` (the gateway shuts down), `lost` (UNAVAILABLE, UNKNOWN, or grpcio's own
    INTERNAL: the connection was lost or refused) or `busy` (batches another call is sending
    under the key)."""
    detail: str
    """The status that ended the stream (`UNAVAILABLE: ...`), or for `busy` how many batches."""
    resume: int
    """The resume it waits for, from 1, of `limit`."""
    limit: int
    pause: float
    """Seconds it pauses first."""
    wait: float
    """Then at most this many seconds for the gateway to accept connections."""
    gave_up: bool = False
    """The gateway did not accept connections within `wait`: the send ends with its error."""


OnWait: TypeAlias = Callable[[Waiting], None]


@dataclass(frozen=True)
class StreamSend:
    """What every stream of one send shares: where it goes, what opens it, how it resumes."""

    channel: grpc.aio.Channel
    stub: pb_grpc.CanvasGatewayServiceAsyncStub
    metadata: tuple[tuple[str, str], ...]
    first: pb.StreamHeader
    """The first request of each stream: the trigger without its recipients, and the options."""
    head: tuple[pb.Recipient, ...]
    """The header's recipients: they go first, in chunks like the others."""
    chunk_size: int
    timeout: float | None
    """Bounds the whole send, every stream and wait, in seconds."""
    resume_wait: float
    on_wait: OnWait | None


async def resumable(
    send: StreamSend, recipients: Recipients, state: _Resumable
) -> AsyncGenerator[Tracked, None]:
    """The send without a key: a stream the gateway ends by draining goes on in a new one with
    the recipients without a result (see `CanvasGatewayClient.send_stream`)."""
    source = _Source(recipients, send.chunk_size)
    backlog: list[tuple[int, pb.Recipient]] = list(enumerate(send.head))
    source.position = len(backlog)
    loop = asyncio.get_running_loop()
    deadline = None if send.timeout is None else loop.time() + send.timeout
    try:
        while True:
            stream = state.new_stream()
            call = send.stub.SendStream(
                _requests(send.first, backlog, source, stream, send.chunk_size),
                metadata=send.metadata,
                timeout=None if deadline is None else max(0.0, deadline - loop.time()),
                wait_for_ready=bool(state.resumes),
            )
            last: pb.SendSummary | None = None
            error: grpc.aio.AioRpcError | None = None
            try:
                async for response in call:
                    if response.HasField("result"):
                        for tracked in state.take(response.result):
                            yield tracked
                    elif response.HasField("summary"):  # a message with no part is skipped
                        last = response.summary
            except grpc.aio.AioRpcError as exc:
                error = exc
            finally:
                stream.stop.set()  # this stream's requests read no further
                call.cancel()  # a no-op once the call is done; stops the RPC if the caller left early
            state.request_ids.append(await _request_id(call))
            if error is None:
                break
            wait = send.resume_wait if deadline is None else min(send.resume_wait, deadline - loop.time())
            if not state.can_resume(resume_position(error)) or not await _ready(
                send.channel, _waiting(error, state.resumes, state.limit, wait), send.on_wait
            ):
                for tracked in state.release():
                    yield tracked
                if source.failure is not None:  # e.g. no recipient was readable: the input error is the cause
                    raise source.failure from error
                raise error
            backlog = state.resume() or await source.next(asyncio.Event()) or []
            if not backlog:
                break  # the drain came after the last recipient had its result: nothing left
        for tracked in state.release():
            yield tracked
        yield state.summary(last if error is None else None)
    finally:
        source.close()
    if source.failure is not None:
        raise source.failure


async def keyed(
    send: StreamSend, recipients: Callable[[], Recipients], state: _Keyed
) -> AsyncGenerator[Tracked, None]:
    """The send with an idempotency key and resumes: each stream sends the whole sequence from
    position 0 (see `_Keyed`)."""
    loop = asyncio.get_running_loop()
    deadline = None if send.timeout is None else loop.time() + send.timeout
    while True:
        source = _Source(recipients(), send.chunk_size)
        source.position = len(send.head)
        stream = _Stream(0)
        last: pb.SendSummary | None = None
        error: grpc.aio.AioRpcError | None = None
        try:
            call = send.stub.SendStream(
                _requests(send.first, list(enumerate(send.head)), source, stream, send.chunk_size),
                metadata=send.metadata,
                timeout=None if deadline is None else max(0.0, deadline - loop.time()),
                wait_for_ready=bool(state.resumes),
            )
            try:
                async for response in call:
                    if response.HasField("result"):
                        for tracked in state.take(stream, response.result):
                            yield tracked
                        if state.forgotten is not None:
                            break  # every later batch would be sent again too: stop now
                    elif response.HasField("summary"):  # a message with no part is skipped
                        last = response.summary
            except grpc.aio.AioRpcError as exc:
                error = exc
            finally:
                stream.stop.set()  # this stream's requests read no further
                call.cancel()  # a no-op once the call is done; stops the RPC if the caller left early
            state.request_ids.append(await _request_id(call))
        finally:
            source.close()
        if state.forgotten is not None:
            log.error("%s", KeyForgotten(state.forgotten))
            for tracked in state.release():
                yield tracked
            raise KeyForgotten(state.forgotten)
        left = None if deadline is None else deadline - loop.time()
        if await _resume_keyed(send.channel, state, error, left, send.resume_wait, send.on_wait):
            state.resumes += 1
            continue
        for tracked in state.release():
            yield tracked
        if error is not None:
            if source.failure is not None:  # e.g. no recipient was readable: the input error is the cause
                raise source.failure from error
            raise error
        yield state.summary(last)
        if source.failure is not None:
            raise source.failure
        return


async def _requests(
    first: pb.StreamHeader,
    backlog: list[tuple[int, pb.Recipient]],
    source: _Source,
    stream: _Stream,
    chunk_size: int,
) -> AsyncIterator[pb.SendStreamRequest]:
    yield pb.SendStreamRequest(header=first)
    for start in range(0, len(backlog), chunk_size):
        yield stream.track(backlog[start : start + chunk_size])
    while (entries := await source.next(stream.stop)) is not None:
        yield stream.track(entries)


def _connection_lost(error: grpc.aio.AioRpcError) -> bool:
    """Whether a stream ended by `error` may go on, with its key, in a new one: the gateway drained,
    or the connection to it was lost (KEYED_RESUME_CODES, CORE_INTERNAL_DETAILS)."""
    if error.code() in KEYED_RESUME_CODES:
        return True
    return error.code() == grpc.StatusCode.INTERNAL and error.details() == CORE_INTERNAL_DETAILS


async def _resume_keyed(
    channel: grpc.aio.Channel,
    state: _Keyed,
    error: grpc.aio.AioRpcError | None,
    left: float | None,
    resume_wait: float,
    on_wait: OnWait | None = None,
) -> bool:
    """Whether a keyed stream that ended with `error` (None: normally) goes on in a new one, once
    the gateway is ready: when resumes and time (`left`, None: no deadline) remain, after a
    drain or a lost connection, or after a normal end holding batches another call was
    sending (after their RetryInfo delay)."""
    if state.resumes >= state.limit or (left is not None and left <= 0):
        return False
    wait = resume_wait if left is None else min(resume_wait, left)
    if error is not None:
        return _connection_lost(error) and await _ready(
            channel, _waiting(error, state.resumes, state.limit, wait), on_wait
        )
    delay = state.busy_delay()
    if delay is None or (left is not None and delay >= left):
        return False
    busy = sum(held.response.result.code == grpc.StatusCode.ABORTED.value[0] for held in state.held.values())
    waiting = Waiting("busy", f"{busy} batches", state.resumes + 1, state.limit, delay, wait)
    return await _ready(channel, waiting, on_wait)


def _waiting(error: grpc.aio.AioRpcError, resumes: int, limit: int, wait: float) -> Waiting:
    """The wait before resume `resumes + 1` after a stream ended by `error`: a pause that
    doubles with each resume, then up to `wait` seconds for the gateway."""
    cause: Literal["draining", "lost"] = "draining" if resume_position(error) is not None else "lost"
    detail = f"{error.code().name}: {error.details() or ''}"
    return Waiting(cause, detail, resumes + 1, limit, min(RESUME_BACKOFF_SECONDS * 2**resumes, 5.0), wait)


async def _ready(channel: grpc.aio.Channel, waiting: Waiting, on_wait: OnWait | None) -> bool:
    """Tell `on_wait`, pause, then wait up to `waiting.wait` seconds for the gateway; tell
    `on_wait` again when it does not come back."""
    if on_wait is not None:
        on_wait(waiting)
    ready = await _ready_after(channel, waiting.pause, waiting.wait)
    if not ready and on_wait is not None:
        on_wait(waiting._replace(gave_up=True))
    return ready


async def _ready_after(channel: grpc.aio.Channel, pause: float, wait: float) -> bool:
    """Pause `pause` seconds, then wait up to `wait` seconds for the gateway."""
    await asyncio.sleep(pause)
    try:
        async with asyncio.timeout(max(0.0, wait)):
            await channel.channel_ready()
    except TimeoutError:
        return False
    return True
