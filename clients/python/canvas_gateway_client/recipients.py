"""What a send takes: a trigger and recipients as generated messages or Braze JSON bodies
(Mappings, parsed with `json_format`; an unknown field raises `json_format.ParseError`), read
lazily in chunks, and read again from the first when a keyed stream resumes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from google.protobuf import json_format

DEFAULT_CHUNK_SIZE = 500
"""Recipients per stream message: hundreds per message keep the gateway's CPU cost low."""

TriggerLike: TypeAlias = pb.CanvasTrigger | Mapping[str, Any]
RecipientLike: TypeAlias = pb.Recipient | Mapping[str, Any]
Recipients: TypeAlias = Iterable[RecipientLike] | AsyncIterable[RecipientLike]
RecipientSource: TypeAlias = Recipients | Callable[[], Recipients]
"""Recipients, or a function of no arguments that returns them afresh on each call (a stream
with an idempotency key is resumed by reading them again from the first)."""


def _as_dict(body: Mapping[str, Any]) -> dict[str, Any]:
    return body if isinstance(body, dict) else dict(body)


def to_trigger(body: TriggerLike) -> pb.CanvasTrigger:
    """A CanvasTrigger from itself or from a Braze `/canvas/trigger/send` JSON body."""
    if isinstance(body, pb.CanvasTrigger):
        return body
    if isinstance(body, Mapping):
        return json_format.ParseDict(_as_dict(body), pb.CanvasTrigger())
    raise TypeError(f"expected a CanvasTrigger or a Mapping, not {type(body).__name__}")


def to_recipient(item: RecipientLike) -> pb.Recipient:
    """A Recipient from itself or from one Braze recipient JSON object."""
    if isinstance(item, pb.Recipient):
        return item
    if isinstance(item, Mapping):
        return json_format.ParseDict(_as_dict(item), pb.Recipient())
    raise TypeError(f"expected a Recipient or a Mapping, not {type(item).__name__}")


async def _aiter_any(items: Recipients) -> AsyncIterator[RecipientLike]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


async def chunked(recipients: Recipients, size: int) -> AsyncIterator[list[pb.Recipient]]:
    """Lazily group `recipients` into lists of `size`.

    A list is yielded as soon as it is full, before the next recipient is pulled, so
    at most one is held in memory and a slow source never delays a full one.
    If the source (or parsing an item) raises, the recipients before the failing one
    are yielded first, then the error propagates.
    """
    chunk: list[pb.Recipient] = []
    try:
        async for item in _aiter_any(recipients):
            chunk.append(to_recipient(item))
            if len(chunk) >= size:
                yield chunk
                chunk = []
    except Exception:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


class _Source:
    """The caller's recipients in chunks, read by one stream after another.

    A read cut short because its stream ended stays pending for the next stream, so no
    recipient is lost or read twice. A failure to read or parse ends the input; it is kept in
    `failure`, to be raised once the stream has drained.
    """

    def __init__(self, recipients: Recipients, size: int) -> None:
        self._chunks = chunked(recipients, size)
        self._pending: asyncio.Future[list[pb.Recipient]] | None = None
        self.position = 0  # the caller's position of the next recipient
        self.ended = False
        self.failure: Exception | None = None

    async def next(self, stop: asyncio.Event) -> list[tuple[int, pb.Recipient]] | None:
        """The next chunk with the caller's positions; None at the end, or once `stop` is set."""
        if self.ended:
            return None
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self._chunks))
        if not self._pending.done():
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait((self._pending, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
        if stop.is_set() or not self._pending.done():
            return None  # the read stays pending for the next stream
        reading, self._pending = self._pending, None
        try:
            chunk = reading.result()
        except StopAsyncIteration:
            self.ended = True
            return None
        except Exception as exc:  # raised to the caller once the stream has drained
            self.ended, self.failure = True, exc
            return None
        start, self.position = self.position, self.position + len(chunk)
        return list(enumerate(chunk, start))

    def close(self) -> None:
        """Stop a read still under way (the send is over)."""
        if self._pending is None:
            return
        if self._pending.done() and not self._pending.cancelled():
            self._pending.exception()  # retrieved: a failure no stream read is not worth a warning
        self._pending.cancel()


def _rereadable(recipients: RecipientSource) -> Callable[[], Recipients] | None:
    """How to read `recipients` again from the first: a Sequence, or a function that returns
    them afresh; None for anything else (an iterator or generator reads once)."""
    if isinstance(recipients, Iterable | AsyncIterable):
        if isinstance(recipients, Sequence) and not isinstance(recipients, str | bytes | bytearray):
            return lambda: recipients
        return None
    return recipients


def _once(recipients: RecipientSource) -> Recipients:
    if isinstance(recipients, Iterable | AsyncIterable):
        return recipients
    return recipients()
