"""The asyncio client for canvas_gateway.v1.CanvasGatewayService.

    async with CanvasGatewayClient("127.0.0.1:50051", token) as client:
        response = await client.send(braze_body)
        async for message in client.send_stream(header, recipients, chunk_size=500, resumes=5):
            ...
        # Safe to send again, and resumed from the start on a lost connection too:
        async for message in client.send_stream(
            header, recipient_list, idempotency_key="order-2026-11-29", resumes=5
        ):
            ...

Requests take either generated messages or Braze JSON bodies (Mappings, parsed with
`json_format`; an unknown field raises `json_format.ParseError`). RPC failures are
`grpc.aio.AioRpcError`; `bad_request_violations` reads the field violations the gateway
attaches to INVALID_ARGUMENT, and `error_info` / `resume_position` the google.rpc.ErrorInfo of a
stream ended by a draining gateway. The bearer token is sent as metadata on every call and is
kept out of every repr and exception text.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import grpc
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway.v1 import canvas_gateway_pb2_grpc as pb_grpc

from . import spreading, streaming
from .connection import DEFAULT_OPTIONS, ChannelOptions, bearer_metadata, open_channel
from .errors import SentAsOneStream
from .keyed import _Keyed
from .recipients import DEFAULT_CHUNK_SIZE, RecipientSource, TriggerLike, _once, _rereadable, to_trigger
from .streaming import OnWait
from .tracking import Tracked, _Resumable


class CanvasGatewayClient:
    """An async client for one gateway; use it as an async context manager.

    `target` is a gRPC target such as "127.0.0.1:50051". Without `credentials` the channel
    is plaintext (loopback and tests); pass `grpc.ssl_channel_credentials()` otherwise.
    `options` are gRPC channel arguments, on top of `DEFAULT_OPTIONS`.

    `connections` (default 1) is how many connections a `send_stream` spreads its recipients
    over, a stream on each at once: a gateway's CGW_WORKERS workers share one port and the kernel
    hands each connection to one of them, so set it to the gateway's workers (or more) to keep
    them all busy. Above 1 the recipients go in parts of PART_SIZE, a stream each (see
    `send_stream`); unary calls use one connection of their own.
    """

    def __init__(
        self,
        target: str,
        token: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions = (),
        connections: int = 1,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self._metadata = bearer_metadata(token)
        self._connections = connections
        self._spread: list[tuple[grpc.aio.Channel, pb_grpc.CanvasGatewayServiceAsyncStub]] = []
        self._target = target
        self._credentials = credentials
        self._options = (*DEFAULT_OPTIONS, *options)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.CanvasGatewayServiceAsyncStub | None = None

    def __repr__(self) -> str:
        security = "insecure" if self._credentials is None else "secure"
        spread = f", connections={self._connections}" if self._connections > 1 else ""
        return f"{type(self).__name__}(target={self._target!r}, {security}{spread})"

    @property
    def connections(self) -> int:
        """How many connections a `send_stream` spreads over."""
        return self._connections

    @property
    def target(self) -> str:
        """The gRPC target this client connects to."""
        return self._target

    def _service(self) -> tuple[grpc.aio.Channel, pb_grpc.CanvasGatewayServiceAsyncStub]:
        # The channel is opened on first use, inside the running event loop.
        if self._channel is None or self._stub is None:
            self._channel = open_channel(self._target, self._credentials, self._options)
            self._stub = pb_grpc.CanvasGatewayServiceStub(self._channel)
        return self._channel, self._stub

    def _connection(self, index: int) -> tuple[grpc.aio.Channel, pb_grpc.CanvasGatewayServiceAsyncStub]:
        """Connection `index` of a spread send: with one, the client's channel; else a channel of
        its own each (a local subchannel pool: gRPC would share one connection among them)."""
        if self._connections == 1:
            return self._service()
        while len(self._spread) <= index:
            options = (*self._options, ("grpc.use_local_subchannel_pool", 1))
            channel = open_channel(self._target, self._credentials, options)
            self._spread.append((channel, pb_grpc.CanvasGatewayServiceStub(channel)))
        return self._spread[index]

    async def __aenter__(self) -> Self:
        self._service()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel, cancelling RPCs still running; the client may be reused after."""
        channel, self._channel, self._stub = self._channel, None, None
        spread, self._spread = self._spread, []
        if channel is not None:
            await channel.close()
        for each, _ in spread:
            await each.close()

    async def send(
        self,
        trigger: TriggerLike,
        *,
        validate_only: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, sent to the server
        idempotency_key: str | None = None,
    ) -> pb.SendResponse:
        """Send one request (unary Send): one result per batch of at most 50, in batch order.

        With `idempotency_key` (1 to 128 of [A-Za-z0-9._:-], scoped to your tenant) the gateway
        keeps each batch's final result: after a failure, send the same request again with the
        same key and nothing is sent twice; results it had kept come back with `replayed` true.

        Raises grpc.aio.AioRpcError; for INVALID_ARGUMENT nothing was sent and
        `bad_request_violations` names the fields.
        """
        request = pb.SendRequest(
            trigger=to_trigger(trigger),
            options=pb.SendOptions(validate_only=validate_only, idempotency_key=idempotency_key or ""),
        )
        _, stub = self._service()
        return await stub.Send(request, metadata=self._metadata, timeout=timeout)

    async def get_results(
        self,
        *,
        idempotency_key: str = "",
        request_id: str = "",
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, sent to the server
    ) -> AsyncGenerator[pb.GetResultsResponse, None]:
        """An earlier request's kept results (GetResults), named by its idempotency key or its
        request id (exactly one): each result as it was made, in position order, then a summary.
        Braze is not called. Raises grpc.aio.AioRpcError (NOT_FOUND: nothing kept for it)."""
        request = pb.GetResultsRequest(idempotency_key=idempotency_key, request_id=request_id)
        _, stub = self._service()
        async for response in stub.GetResults(request, metadata=self._metadata, timeout=timeout):
            yield response

    async def find_recipient(
        self,
        recipient: pb.Recipient,
        *,
        idempotency_key: str = "",
        request_id: str = "",
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, sent to the server
    ) -> pb.FindRecipientResponse:
        """One recipient of an earlier request (FindRecipient): its position and its batch's result."""
        request = pb.FindRecipientRequest(
            idempotency_key=idempotency_key, request_id=request_id, recipient=recipient
        )
        _, stub = self._service()
        return await stub.FindRecipient(request, metadata=self._metadata, timeout=timeout)

    async def list_unknown(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, sent to the server
    ) -> AsyncIterator[pb.ListUnknownResponse]:
        """Your UNKNOWN batches that no acknowledged replay has sent again (ListUnknown)."""
        _, stub = self._service()
        async for batch in stub.ListUnknown(
            pb.ListUnknownRequest(), metadata=self._metadata, timeout=timeout
        ):
            yield batch

    async def replay(
        self,
        *,
        acknowledge_duplicates: bool,
        idempotency_key: str = "",
        request_id: str = "",
        batch_indexes: Sequence[int] = (),
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, sent to the server
    ) -> pb.ReplayResponse:
        """Send UNKNOWN batches of an earlier request again, once (Replay): `batch_indexes`, or
        every UNKNOWN one. A recipient may get the Canvas twice: without `acknowledge_duplicates`
        the gateway sends nothing (FAILED_PRECONDITION)."""
        request = pb.ReplayRequest(
            idempotency_key=idempotency_key,
            request_id=request_id,
            batch_indexes=batch_indexes,
            acknowledge_duplicates=acknowledge_duplicates,
        )
        _, stub = self._service()
        return await stub.Replay(request, metadata=self._metadata, timeout=timeout)

    async def send_stream(
        self,
        header: TriggerLike,
        recipients: RecipientSource,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        validate_only: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, sent to the server
        resumes: int = 0,
        resume_wait: float = 60.0,
        idempotency_key: str | None = None,
        on_wait: OnWait | None = None,
        ordered: bool = False,
    ) -> AsyncIterator[pb.SendStreamResponse]:
        """Stream `recipients` (after any in `header`) and yield the gateway's responses.

        Yields a `result` per batch as it completes (not in batch order; `positions` are
        offsets in the caller's order across header and `recipients`), then a `summary`.
        `recipients` is read lazily, one chunk ahead of the network, so memory stays flat.

        With `resumes` > 0, a stream the gateway ends by draining (UNAVAILABLE with the
        DRAINING ErrorInfo) goes on in a new stream, up to that many times: the recipients
        without a result are sent again, never one that has a result. Retryable NOT_ATTEMPTED
        results are held back meanwhile, and their recipients sent again on a resume (they are
        yielded when the stream ends otherwise). Every position gets exactly one result, in the
        caller's positions, and batch indexes go on across streams. A resume waits up to
        `resume_wait` seconds for the gateway to accept connections; `timeout` bounds the whole
        send; `on_wait`, when given, is told each wait before it starts (see `Waiting`). After a
        resume the summary is the client's count of the results it yielded, and
        its `request_id` lists each stream's request id, comma-separated.

        With `idempotency_key` the gateway keeps each batch's final result under the key, so
        the same stream sent again with the same key sends nothing twice (kept results come back
        with `replayed` true). A resume then sends the whole stream again from position 0 under
        the key, instead of only what has no result: after a drain, and after any UNAVAILABLE
        (a lost connection, a gateway that died), UNKNOWN (a proxy's reset stream) or grpcio's
        own INTERNAL "Internal error from Core" (a write on a lost connection). Each batch's
        result is yielded once: one that comes back again is dropped. A batch another call was
        sending (NOT_ATTEMPTED, ABORTED) is tried again by a resume after its RetryInfo delay.
        Positions and batch indexes are the gateway's, the same in every stream. For this the
        recipients must be readable again from the first, in the same order: pass a Sequence,
        or a function of no arguments that returns them afresh (an iterable or async iterable)
        (it is read once; what a resume sends again is held, see below). From an iterator or
        generator, the first part is never resumed with a key (the error is raised, as with
        `resumes=0`); send it again yourself, with the key.
        A batch whose result did not stand (held past 64, CANVAS_INACTIVE, a REJECTED)
        and that a later stream sends gets its later result too: the one batch yielded twice.
        The gateway must still hold the key's results (Redis shared by every replica; without
        CGW_REDIS_URL, only the gateways of one host share them): a batch whose result stood that
        comes back sent again stops the send at once with KeyForgotten.

        If reading or parsing `recipients` raises, every recipient before the failing one
        is sent and nothing after it is read; the stream is closed normally, so each of
        them gets its result, and the error is raised after the summary (or, when the
        gateway then fails the stream, for example because no recipient came, in place
        of its AioRpcError). A failed RPC raises grpc.aio.AioRpcError.

        With the client's `connections` above 1, or with `idempotency_key`, the recipients go in
        parts of PART_SIZE (5,000, the header's first), each its own stream with the resumes
        above: up to `connections` at once, each on a connection of its own. Under a key, part 0
        is sent under the key and part `i` under `part_key(key, i)` (`<key>.part-<i>`), whatever
        `connections`: a resend with any `connections` sends nothing twice. Part 0 is sent as it
        is read; the later parts are read whole first and held until sent, so they resume under
        the key even from an iterator. Results carry your positions, and part `i`'s batch
        indexes start at `i * 5,000`; a failed part stops the parts not started, and its error is
        raised once the others end. With `ordered` the results come in position order (held
        until every position before theirs has its result). A send of several parts ends with
        the parts' summaries added up, their request ids comma-separated.
        """
        async for tracked in self.send_stream_tracked(
            header,
            recipients,
            chunk_size=chunk_size,
            validate_only=validate_only,
            timeout=timeout,
            resumes=resumes,
            resume_wait=resume_wait,
            idempotency_key=idempotency_key,
            on_wait=on_wait,
            ordered=ordered,
        ):
            yield tracked.response

    async def send_stream_tracked(
        self,
        header: TriggerLike,
        recipients: RecipientSource,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        validate_only: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline, sent to the server
        resumes: int = 0,
        resume_wait: float = 60.0,
        idempotency_key: str | None = None,
        on_wait: OnWait | None = None,
        ordered: bool = False,
    ) -> AsyncIterator[Tracked]:
        """`send_stream`, each response with the recipients its result holds (see `Tracked`)."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if resumes < 0:
            raise ValueError("resumes must not be negative")
        trigger = to_trigger(header)
        stream = _OneStream(self, chunk_size, validate_only, resumes, resume_wait, on_wait)
        shape = await self._shape(idempotency_key, timeout) if idempotency_key else None
        if shape is True:
            results = stream(0, trigger, recipients, idempotency_key, timeout)  # as it was first sent
        elif self._connections == 1 and not idempotency_key and not ordered:
            results = stream(0, trigger, recipients, None, timeout)
        else:  # in parts: the parts of a keyed send are the same whatever the connections
            later = None
            if idempotency_key and shape is None:  # not known yet: asked again before part 1
                later = functools.partial(self._refuse_one_stream, idempotency_key, timeout)
            results = spreading.spread(
                stream,
                self._connections,
                trigger,
                recipients,
                idempotency_key or None,
                timeout,
                ordered,
                later,
            )
        async with contextlib.aclosing(results):  # a caller that stops early ends the RPCs now
            async for tracked in results:
                yield tracked

    async def _shape(self, key: str, timeout: float | None) -> bool | None:  # noqa: ASYNC109
        """`_sent_as_one_stream`, or None when the gateway does not answer now (a stream's
        resumes wait for it; the question is asked again before a second part is sent)."""
        try:
            return await self._sent_as_one_stream(key, timeout)
        except grpc.aio.AioRpcError:
            return None

    async def _refuse_one_stream(self, key: str, timeout: float | None) -> None:  # noqa: ASYNC109
        if await self._sent_as_one_stream(key, timeout):
            raise SentAsOneStream(len(key))

    async def _sent_as_one_stream(self, key: str, timeout: float | None) -> bool:  # noqa: ASYNC109
        """Whether `key`'s results hold a position past the first part (PART_SIZE): it was sent
        as one stream by a client that does not cut sends into parts (another language's, or
        this one before 1.1), so its resend is one stream too, under `key` (in parts, the later
        parts would go under keys of their own and be sent again). Results come in position
        order: at most a part's results are read. Nothing kept (NOT_FOUND, also when the gateway
        keeps no results, CGW_RESULTS_KEPT=false): False."""
        try:
            found = self.get_results(idempotency_key=key, timeout=timeout)
            async with contextlib.aclosing(found):
                async for response in found:
                    if (
                        response.HasField("result")
                        and max(response.result.positions, default=0) >= spreading.PART_SIZE
                    ):
                        return True
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
        return False


@dataclass(frozen=True)
class _OneStream:
    """Sends recipients in one SendStream (and its resumes) on one of a client's connections."""

    client: CanvasGatewayClient
    chunk_size: int
    validate_only: bool
    resumes: int
    resume_wait: float
    on_wait: OnWait | None

    async def __call__(
        self,
        connection: int,
        trigger: pb.CanvasTrigger,
        recipients: RecipientSource,
        key: str | None,
        timeout: float | None,  # noqa: ASYNC109 - a gRPC deadline, sent to the server
    ) -> AsyncGenerator[Tracked, None]:
        head = pb.CanvasTrigger()
        head.CopyFrom(trigger)
        del head.recipients[:]  # the header's recipients go first, in chunks like the others
        options = pb.SendOptions(validate_only=self.validate_only, idempotency_key=key or "")
        first = pb.StreamHeader(trigger=head, options=options)
        channel, stub = self.client._connection(connection)
        send = streaming.StreamSend(
            channel,
            stub,
            self.client._metadata,
            first,
            tuple(trigger.recipients),
            self.chunk_size,
            timeout,
            self.resume_wait,
            self.on_wait,
        )
        again = _rereadable(recipients)
        resumes = self.resumes
        if key and resumes and again is not None:
            results = streaming.keyed(send, again, _Keyed(resumes))
        else:
            if key:
                resumes = 0  # read once: a resume of what has no result would not match the kept batches
            results = streaming.resumable(send, _once(recipients), _Resumable(resumes))
        async with contextlib.aclosing(results):
            async for tracked in results:
                yield tracked
